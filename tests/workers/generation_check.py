"""Multi-rank worker for the rollout engine. For each converted checkpoint in the reference file:

- greedy tokens on a left-padded batch with EOS reached mid-batch vs transformers' generate
  (stored in the reference), and the same prompts right-padded;
- cached decoding vs uncached recomputation: every generated row re-scored by a plain megatron
  forward (get_forward_backward_func, no cache) gives the same log-probs, and greedy rows its argmax;
- top-k 1 equals greedy; sampled tokens (seeded) equal the tp1 run's and a second run's;
- the shared-prefill (greedy, sampled) pair equals two separate generations; no padded vocab ids;
- prompt groups pipelined through the stages (pipeline_micro_batches) give the pair's tokens.

  python generation_check.py --ref REF.pt --report OUT.json [--save-sampled S.pt]
  torchrun --nproc-per-node 2 generation_check.py --ref REF.pt --tp 2 --report OUT.json --sampled S.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from remax_megatron.models.checkpoint import load_model
from remax_megatron.ops.logprobs import vocab_parallel_log_probs
from remax_megatron.rollout.engine import generate
from remax_megatron.rollout.sampling import GREEDY, SamplingParams
from remax_megatron.runtime.distributed import init_runtime, shutdown
from remax_megatron.training.engine import forward_backward
from worker_io import layout_parser, write_report

SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)


def rescore(model, prompt_ids, prompt_mask, out, vocab):
    """Uncached log-probs of each row's generated tokens: one right-padded sequence per row
    (prompt then response) through megatron's standard forward."""
    rows = []
    for r in range(out.tokens.size(0)):
        b = int(out.prompt_index[r])
        prompt = prompt_ids[b][prompt_mask[b].bool()]
        response = out.tokens[r, :int(out.lengths[r])]
        rows.append((prompt, response))
    width = max(len(p) + len(s) for p, s in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, s) in enumerate(rows):
        ids[i, :len(p) + len(s)] = torch.cat([p, s])
    results = {}

    def loss_fn(output, batch):
        logits = output[:, :-1]
        lp = vocab_parallel_log_probs(logits, batch["input_ids"][:, 1:], vocab)
        results["log_probs"] = lp.detach()
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.detach().contiguous(), group=group)
        results["argmax"] = torch.cat(parts, -1)[..., :vocab].argmax(-1)
        return lp.sum() * 0, torch.tensor(1), {}

    batch = {"input_ids": ids, "position_ids": torch.arange(width).expand_as(ids)}
    model.config.calculate_per_token_loss = True
    forward_backward(model, [batch], loss_fn, seq_length=width, micro_batch_size=len(rows),
                     forward_only=True)
    if not results:
        return None
    worst_lp, argmax_ok = 0.0, True
    for i, (p, s) in enumerate(rows):
        start = len(p) - 1  # logits at position t predict token t + 1
        want = results["log_probs"][i, start:start + len(s)]
        got = out.log_probs[i, :len(s)]
        worst_lp = max(worst_lp, (want - got).abs().max().item())
        if int(out.continuation[i]) == 0:  # continuation 0 is greedy in every call checked here
            argmax_ok &= torch.equal(results["argmax"][i, start:start + len(s)], s)
    return worst_lp, argmax_ok


def masked(out):
    return (out.tokens * out.response_mask).tolist()


def check_case(name, case, args, report, sampled_store):
    model, ckpt = load_model(case["checkpoint"])
    vocab = ckpt.config.vocab_size
    ids, mask = case["prompt_ids"], case["prompt_mask"]
    common = dict(max_new_tokens=case["max_new_tokens"], eos_token_ids=[case["eos"]],
                  vocab_size=vocab, seed=5)
    greedy = generate(model, ids, mask, **common)
    report[f"{name}/greedy_matches_transformers"] = masked(greedy) == case["hf_tokens"]
    report[f"{name}/finish_reasons"] = greedy.finish_reason == case["hf_finish"]

    right_ids, right_mask = case["right_ids"], case["right_mask"]
    right = generate(model, right_ids, right_mask, **common)
    report[f"{name}/right_padded_same_tokens"] = masked(right) == masked(greedy)

    top1 = generate(model, ids, mask, continuations=[SamplingParams(top_k=1)], **common)
    report[f"{name}/top_k1_is_greedy"] = masked(top1) == masked(greedy)

    sampled = generate(model, ids, mask, continuations=[SAMPLED], **common)
    again = generate(model, ids, mask, continuations=[SAMPLED], **common)
    report[f"{name}/sampled_reproducible"] = masked(sampled) == masked(again)
    report[f"{name}/no_padded_vocab"] = int(sampled.tokens.max()) < vocab
    sampled_store[name] = masked(sampled)
    if args.sampled:
        reference = torch.load(args.sampled)[name]
        report[f"{name}/sampled_same_as_tp1"] = masked(sampled) == reference

    pair = generate(model, ids, mask, continuations=[GREEDY, SAMPLED], **common)
    pair_rows = masked(pair)
    report[f"{name}/pair_greedy_equals_separate"] = pair_rows[0::2] == masked(greedy)
    report[f"{name}/pair_sampled_equals_separate"] = pair_rows[1::2] == masked(sampled)
    report[f"{name}/pair_rows_differ"] = pair_rows[0::2] != pair_rows[1::2]

    # prompt groups that follow each other through the pipeline (a no-op without pp): the
    # default pair above ran the prefill in groups; whole-batch and 3 uneven groups must agree
    whole = generate(model, ids, mask, continuations=[GREEDY, SAMPLED],
                     pipeline_micro_batches=1, **common)
    grouped = generate(model, ids, mask, continuations=[GREEDY, SAMPLED],
                       pipeline_micro_batches=3, **common)
    report[f"{name}/pipeline_groups_same_tokens"] = (masked(grouped) == pair_rows
                                                     and masked(whole) == pair_rows)
    report[f"{name}/pipeline_groups_logprob_err"] = max(
        (other.log_probs - pair.log_probs).abs().max().item() for other in (grouped, whole))

    for label, out in (("greedy", greedy), ("pair", pair)):
        scored = rescore(model, ids, mask, out, vocab)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, scored)
        scored = next(s for s in gathered if s is not None)
        report[f"{name}/cached_vs_uncached_{label}_max_logprob_err"] = scored[0]
        report[f"{name}/cached_vs_uncached_{label}_argmax"] = scored[1]


def main() -> int:
    parser = layout_parser()
    parser.add_argument("--sampled", help="sampled tokens of the tp1 run to compare against")
    parser.add_argument("--save-sampled")
    args = parser.parse_args()
    init_runtime(tp=args.tp, pp=args.pp, timeout_minutes=5)
    ref = torch.load(args.ref, weights_only=False)
    report, sampled_store = {}, {}
    for name, case in ref.items():
        check_case(name, case, args, report, sampled_store)
    write_report(args.report, report)
    if dist.get_rank() == 0 and args.save_sampled:
        torch.save(sampled_store, args.save_sampled)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
