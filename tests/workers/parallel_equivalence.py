"""Multi-rank worker: one megatron-core code path run at tp=1/pp=1 (the reference) and at another
layout, on the same weights and inputs; rank 0 writes every comparison to a JSON report.

  python parallel_equivalence.py --reference REF.pt
  torchrun --nproc-per-node N parallel_equivalence.py --check REF.pt --tp T --pp P [--dist-opt]
      --report OUT.json

Per model (Llama with GQA and untied embeddings, GPT-2 with tied embeddings, a GPT-2 reward model):
full-vocab logits, per-token log-probs and entropy (vocab-parallel), the token-mean loss and every
gathered gradient through get_forward_backward_func over several micro-batches, and the weights
after one megatron optimizer step (with clipping active).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from remax_megatron.models.builder import build_model, unwrap
from remax_megatron.models.config import ModelConfig
from remax_megatron.models.sharding import assemble_full, full_state_dict, load_full_state_dict, local_shards
from remax_megatron.ops.logprobs import vocab_parallel_log_probs
from remax_megatron.runtime.distributed import init_runtime, shutdown
from remax_megatron.training.engine import (
    OptimizerSettings, build_optimizer, forward_backward, wrap_ddp,
)
from worker_io import reference_parser

BATCH, SEQ, MBS = 4, 12, 1
LR, CLIP = 1e-3, 0.05

CASES = {
    # vocab 100 pads to 128 (tp1) / 256 (tp2): the padded rows must never matter.
    "llama_gqa": dict(reward=False, config=ModelConfig.llama(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ffn_hidden_size=96, vocab_size=100, max_position_embeddings=64, rope_theta=10000.0)),
    # Qwen3's shape: q/k norms (their grads summed over tp), head_dim not hidden / heads, tied
    "qwen3_qk_norm": dict(reward=False, config=ModelConfig.llama(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        ffn_hidden_size=48, vocab_size=100, max_position_embeddings=64, qk_norm=True,
        tie_word_embeddings=True)),
    "gpt2_tied": dict(reward=False, config=ModelConfig.gpt2(
        num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=64)),
    "gpt2_reward": dict(reward=True, config=ModelConfig.gpt2(
        num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=64)),
}


def _gather_objects(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _gather_tp(tensor: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _make_inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    ids[0, -3:] = vocab - 1  # ids at the top of the true vocabulary
    mask = torch.ones(BATCH, SEQ)
    mask[1, 8:] = 0  # a shorter sequence: its tail is padding
    mask[3, 5:] = 0
    return {"input_ids": ids, "loss_mask": mask}


def _micro_batches(inputs: dict, dp_rank: int, dp: int) -> list[dict]:
    per_rank = BATCH // dp
    out = []
    for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, MBS):
        ids = inputs["input_ids"][i:i + MBS]
        out.append({
            "index": i,
            "input_ids": ids,
            "position_ids": torch.arange(SEQ).unsqueeze(0).expand_as(ids),
            "loss_mask": inputs["loss_mask"][i:i + MBS],
        })
    return out


def _policy_loss(output, batch, vocab, store):
    """Token-mean next-token NLL (sum, count); also records logits, log-probs and entropy."""
    targets = batch["input_ids"][:, 1:]
    logits = output[:, :-1]
    logp, entropy = vocab_parallel_log_probs(logits, targets, vocab, with_entropy=True)
    mask = batch["loss_mask"][:, 1:]
    loss_sum = -(logp * mask).sum()
    count = mask.sum()
    full_logits = _gather_tp(output.detach())[..., :vocab]
    full_log_softmax = torch.log_softmax(full_logits[:, :-1].double(), dim=-1)  # independent
    store.append({
        "index": batch["index"],
        "logits": full_logits,
        "full_vocab_log_probs": full_log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "full_vocab_entropy": -(full_log_softmax.exp() * full_log_softmax).sum(-1),
        "log_probs": logp.detach(),
        "entropy": entropy,
        "loss_sum": loss_sum.detach(),
        "count": count,
    })
    return loss_sum, count.to(torch.int), {}


def _reward_loss(output, batch, store):
    """Scores are [mbs, seq]; a made-up smooth loss gives gradients through the scalar head."""
    mask = batch["loss_mask"]
    loss_sum = ((output - 0.5) ** 2 * mask).sum()
    count = mask.sum()
    store.append({"index": batch["index"], "scores": output.detach(),
                  "loss_sum": loss_sum.detach(), "count": count})
    return loss_sum, count.to(torch.int), {}


def run_case(name: str, spec: dict, full: dict | None, dist_opt: bool) -> dict:
    """Everything one layout computes for one model, gathered to full tensors."""
    from megatron.core import parallel_state

    cfg: ModelConfig = spec["config"]
    model = build_model(cfg, reward=spec["reward"])
    if full is None:
        full = full_state_dict(model)
        g = torch.Generator().manual_seed(11)
        for key, value in full.items():  # exercise norm scales and biases, which init leaves trivial
            if "norm" in key or key.endswith(".bias"):
                full[key] = value + 0.1 * torch.randn(value.shape, generator=g)
    load_full_state_dict(model, full)

    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    batches = _micro_batches(_make_inputs(cfg.vocab_size), dp_rank, dp)
    store: list = []
    if spec["reward"]:
        loss_fn = lambda output, batch: _reward_loss(output, batch, store)  # noqa: E731
    else:
        loss_fn = lambda output, batch: _policy_loss(output, batch, cfg.vocab_size, store)  # noqa

    ddp = wrap_ddp(model, use_distributed_optimizer=dist_opt)
    optimizer = build_optimizer(ddp, OptimizerSettings(lr=LR, weight_decay=0.1, clip_grad=CLIP,
                                                       use_distributed_optimizer=dist_opt))
    ddp.train()
    forward_backward(ddp, batches, loss_fn, seq_length=SEQ, micro_batch_size=MBS)
    grads = {n: p.main_grad.clone() for n, p in unwrap(ddp).named_parameters()}
    applied, grad_norm, _ = optimizer.step()

    per_rank = _gather_objects({
        "tp": parallel_state.get_tensor_model_parallel_rank(),
        "pp": parallel_state.get_pipeline_model_parallel_rank(),
        "dp": dp_rank,
        "store": store if parallel_state.get_tensor_model_parallel_rank() == 0 else [],
        "grads": local_shards(ddp, grads),
        "weights": local_shards(ddp),
    })
    one_replica = sorted((r for r in per_rank if r["dp"] == 0), key=lambda r: (r["pp"], r["tp"]))
    by_stage: dict = {}
    for r in one_replica:
        by_stage.setdefault(r["pp"], []).append(r)

    def assemble(field):
        merged = {}
        for stage in by_stage.values():
            merged.update(assemble_full([r[field] for r in stage], cfg.vocab_size))
        return merged

    records = sorted((s for r in per_rank for s in r["store"]), key=lambda s: s["index"])
    outputs = {key: torch.cat([s[key] for s in records]) for key in records[0]
               if key not in ("index", "loss_sum", "count")}
    outputs["loss"] = (sum(s["loss_sum"] for s in records) / sum(s["count"] for s in records))
    result = {
        "full_init": full,
        "outputs": outputs,
        "grad_norm": torch.tensor(grad_norm),
        "applied": applied,
        "weights_after_step": assemble("weights"),
    }
    if not dist_opt:  # with the distributed optimizer each dp rank holds a shard of the grads
        result["grads"] = assemble("grads")
    return result


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def compare(ref: dict, got: dict) -> dict:
    report = {}
    for key, want in ref["outputs"].items():
        if not key.startswith("full_vocab_"):
            report[f"outputs/{key}"] = _max_err(want, got["outputs"][key])
    for key in ("log_probs", "entropy"):
        if f"full_vocab_{key}" in got["outputs"]:
            outputs = got["outputs"]
            report[f"vp_vs_full/{key}"] = _max_err(outputs[f"full_vocab_{key}"], outputs[key])
    report["grad_norm"] = _max_err(ref["grad_norm"], got["grad_norm"])
    report["applied"] = 0.0 if got["applied"] else float("inf")
    for field in ("grads", "weights_after_step"):
        if field not in got:
            continue
        ref_t = ref[field]
        for key, value in got[field].items():
            # A pipeline-parallel last stage keeps its own copy of tied embeddings.
            want = ref_t.get(key, ref_t.get("embedding.word_embeddings.weight"))
            report[f"{field}/{key}"] = _max_err(want, value)
        missing = sorted(set(ref_t) - set(got[field]))
        if missing:
            report[f"{field}/missing:{missing[0]}"] = float("inf")
    return report


def main() -> int:
    parser = reference_parser()
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()

    init_runtime(tp=args.tp, pp=args.pp, seed=1234, timeout_minutes=5)
    names = args.cases.split(",")
    if args.reference:
        results = {name: run_case(name, CASES[name], None, False) for name in names}
        if dist.get_rank() == 0:
            torch.save(results, args.reference)
    else:
        ref = torch.load(args.check, weights_only=False)
        report = {}
        for name in names:
            got = run_case(name, CASES[name], ref[name]["full_init"], args.dist_opt)
            report.update({f"{name}/{k}": v for k, v in compare(ref[name], got).items()})
        if dist.get_rank() == 0:
            with open(args.report, "w") as f:
                json.dump(report, f, indent=1)
    shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
