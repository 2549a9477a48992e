"""Multi-rank worker: the trainer's ReMax loss and gradients through megatron's schedule, on fixed
rollouts, gathered to full tensors for comparison with a single-process plain-torch computation.

  torchrun --nproc-per-node N train_equivalence.py --ref REF.pt --report OUT.json [--tp T --pp P]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from remax_megatron.data.loader import share_of
from remax_megatron.data.prompts import Prompt
from remax_megatron.models.builder import unwrap
from remax_megatron.models.sharding import assemble_full, local_shards
from remax_megatron.rollout.engine import GenerationOutput
from remax_megatron.training import demo
from remax_megatron.training.config import load_config
from remax_megatron.training.engine import forward_backward
from remax_megatron.training.trainer import TRAIN_STATS, Trainer
from worker_io import layout_parser


def fake_rollout(mine, ref) -> GenerationOutput:
    """Rows [greedy, sampled] per prompt; only the sampled rows are trained on."""
    width = max(len(ref["responses"][i]) for i, _ in mine)
    n = len(mine)
    tokens = torch.zeros(2 * n, width, dtype=torch.long)
    log_probs = torch.zeros(2 * n, width)
    lengths = torch.ones(2 * n, dtype=torch.long)
    for j, (i, _) in enumerate(mine):
        response = ref["responses"][i]
        tokens[2 * j + 1, :len(response)] = torch.tensor(response)
        log_probs[2 * j + 1, :len(response)] = torch.tensor(ref["rollout_log_probs"][i][:len(response)])
        lengths[2 * j + 1] = len(response)
    mask = torch.arange(width)[None] < lengths[:, None]
    return GenerationOutput(tokens=tokens, response_mask=mask, lengths=lengths,
                            finish_reason=["length"] * 2 * n, log_probs=log_probs * mask,
                            prompt_index=torch.arange(n).repeat_interleave(2),
                            continuation=torch.arange(2).repeat(n))


def main() -> int:
    parser = layout_parser()
    args = parser.parse_args()
    ref = torch.load(args.ref, weights_only=False)
    alg = ref["algorithm"]
    n = len(ref["prompts"])
    cfg = load_config(None, [
        f"policy.load={ref['checkpoint']}", "policy.model=null", "policy.builtin_tokenizer=false",
        f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", f"train.global_batch_size={n}",
        "train.micro_batch_size=2", f"algorithm.loss_reduction={alg['loss_reduction']}",
        f"algorithm.gamma={alg['gamma']}", f"algorithm.kl_coef={alg['kl_coef']}",
        f"output_dir={Path(args.report).parent / 'run'}", "log.tensorboard=false",
    ], base=demo.config())
    trainer = Trainer(cfg)
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    prompts = [Prompt(i, "", ids) for i, ids in enumerate(ref["prompts"])]
    mine = share_of(list(enumerate(prompts)), dp_rank, dp)
    out = fake_rollout(mine, ref)
    adv = torch.tensor([ref["advantages"][i] for i, _ in mine])
    batches, width = trainer._micro_batches(mine, out, adv)
    if alg["kl_coef"] > 0:  # the frozen reference's log-probs, aligned like the rollout's
        rows = [i for i, _ in mine]
        for b, batch in enumerate(batches):
            frame = torch.zeros_like(batch["rollout_log_probs"])
            for r in range(frame.size(0)):
                i = rows[b * 2 + r]
                on = batch["loss_mask"][r].bool()
                frame[r, on] = torch.tensor(ref["ref_log_probs"][i][:int(on.sum())])
            batch["ref_log_probs"] = frame
    trainer._train_stats = torch.zeros(len(TRAIN_STATS))
    trainer.ddp.train()
    forward_backward(trainer.ddp, batches, trainer._loss, seq_length=width, micro_batch_size=2)
    grads = {name: p.main_grad.clone() for name, p in unwrap(trainer.ddp).named_parameters()}
    speaker = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage()
    stats = trainer._train_stats if speaker else torch.zeros(len(TRAIN_STATS))
    dist.all_reduce(stats)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {
        "tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
        "dp": dp_rank, "grads": local_shards(trainer.ddp, grads)})
    if dist.get_rank() == 0:
        stages: dict = {}
        for r in sorted((r for r in per_rank if r["dp"] == 0), key=lambda r: (r["pp"], r["tp"])):
            stages.setdefault(r["pp"], []).append(r["grads"])
        full = {}
        for shards in stages.values():
            full.update(assemble_full(shards, trainer.policy.config.vocab_size))
        s = dict(zip(TRAIN_STATS, stats.tolist()))
        report = {"loss": abs(s["loss"] / s["normalizer"] - ref["expected_loss"])}
        scale = max(t.abs().max().item() for t in ref["expected_grads"].values())
        for name, want in ref["expected_grads"].items():
            got = full[name]
            if got.shape != want.shape:
                print("SHAPE", name, tuple(got.shape), tuple(want.shape), flush=True)
            report[f"grad/{name}"] = (got - want).abs().max().item() / scale
        missing = set(ref["expected_grads"]) ^ set(full)
        report["names_match"] = 0.0 if not missing else float("inf")
        Path(args.report).write_text(json.dumps(report, indent=1))
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
