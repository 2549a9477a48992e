"""Multi-rank worker: the trainer's loss and gradients (any algorithm) through megatron's schedule,
on fixed rollouts, gathered to full tensors for comparison with a single-process plain-torch
computation.

  torchrun --nproc-per-node N train_equivalence.py --ref REF.pt --report OUT.json [--tp T --pp P]

The reference holds P prompts and n responses per prompt (prompt-major), each response's
per-sequence outcome (ReMax/GRPO: its advantage, PPO: its score), the log-probs the rollout saw,
and the frozen reference's log-probs and the critic's old values at its tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from remax_megatron.data.loader import share_of
from remax_megatron.data.prompts import Prompt
from remax_megatron.models.builder import sequence_multiple
from remax_megatron.rollout.engine import GenerationOutput
from remax_megatron.training import demo
from remax_megatron.training.config import load_config
from remax_megatron.training.engine import forward_backward
from remax_megatron.training.experience import micro_batches
from remax_megatron.training.trainer import EXPERIENCE_STATS, UPDATE_STATS, Trainer
from worker_io import gather_full_grads, grad_report, layout_parser


def fake_rollout(mine, ref, shape) -> GenerationOutput:
    """k rows per prompt ([greedy,] n sampled); only the sampled rows are trained on."""
    n, k, first = shape.n_samples, shape.k, int(shape.greedy)
    responses = [ref["responses"][i * n + j] for i, _ in mine for j in range(n)]
    width = max(len(r) for r in responses)
    rows = len(mine) * k
    tokens = torch.zeros(rows, width, dtype=torch.long)
    log_probs = torch.zeros(rows, width)
    lengths = torch.ones(rows, dtype=torch.long)
    for p, (i, _) in enumerate(mine):
        for j in range(n):
            row, response = p * k + first + j, ref["responses"][i * n + j]
            tokens[row, :len(response)] = torch.tensor(response)
            log_probs[row, :len(response)] = torch.tensor(
                ref["rollout_log_probs"][i * n + j][:len(response)])
            lengths[row] = len(response)
    mask = torch.arange(width)[None] < lengths[:, None]
    return GenerationOutput(tokens=tokens, response_mask=mask, lengths=lengths,
                            finish_reason=["length"] * rows, log_probs=log_probs * mask,
                            prompt_index=torch.arange(len(mine)).repeat_interleave(k),
                            continuation=torch.arange(k).repeat(len(mine)))


def put_per_token(batches, per_response: list[list[float]], key: str) -> None:
    """Per-response values onto each batch's response positions (the loss mask's frame); a
    batch's ``rows`` name its responses (micro-batches group them by length)."""
    for batch in batches:
        frame = torch.zeros_like(batch["loss_mask"])
        for j, row in enumerate(batch["rows"].tolist()):
            on = batch["loss_mask"][j].bool()
            frame[j, on] = torch.tensor(per_response[row][:int(on.sum())])
        batch[key] = frame


def main() -> int:
    parser = layout_parser()
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    ref = torch.load(args.ref, weights_only=False)
    alg = dict(ref["algorithm"])
    n = alg.pop("n_samples")
    temperature = alg.pop("temperature", 1.0)
    prompts = [Prompt(i, "", ids) for i, ids in enumerate(ref["prompts"])]
    cfg = load_config(None, [
        f"policy.load={ref['checkpoint']}", "policy.model=null", "policy.builtin_tokenizer=false",
        f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", f"parallel.ep={args.ep}",
        f"parallel.sequence_parallel={str(args.sequence_parallel).lower()}",
        f"train.global_batch_size={len(prompts)}", "train.micro_batch_size=2",
        f"rollout.n_samples={n}", f"rollout.temperature={temperature}", f"output_dir={Path(args.report).parent / 'run'}",
        "log.tensorboard=false", f"train.dtype={args.dtype}", *[f"algorithm.{k}={v}" for k, v in alg.items()],
    ], base=demo.config())
    trainer = Trainer(cfg)
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = share_of(list(enumerate(prompts)), dp_rank, dp)
    out = fake_rollout(mine, ref, trainer.shape)
    mine_responses = [i * n + j for i, _ in mine for j in range(n)]
    outcome = torch.tensor([ref["outcomes"][r] for r in mine_responses])
    batches, width = micro_batches(trainer.shape, mine, out, outcome, trainer.pad, 2,
                                   trainer.device, width_multiple=sequence_multiple(trainer.ddp))
    if trainer.reference is not None:
        put_per_token(batches, [ref["ref_log_probs"][r] for r in mine_responses], "ref_log_probs")
    if trainer.critic is not None:
        put_per_token(batches, [ref["values"][r] for r in mine_responses], "values")
    trainer._experience = torch.zeros(len(EXPERIENCE_STATS), dtype=torch.float64,
                                      device=trainer.device)
    trainer._update_stats = torch.zeros(len(UPDATE_STATS), device=trainer.device)
    for chunk in trainer.ddp:  # the policy's virtual pipeline chunks (one here)
        chunk.train()
    forward_backward(trainer.ddp, batches, trainer._loss, seq_length=width, micro_batch_size=2)
    speaker = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage()
    stats = trainer._update_stats if speaker else torch.zeros_like(trainer._update_stats)
    dist.all_reduce(stats)
    full = gather_full_grads(trainer.ddp, Path(args.report).parent,
                             trainer.policy.config.vocab_size, args.ep)
    if dist.get_rank() == 0:
        s = dict(zip(UPDATE_STATS, stats.tolist()))
        report = {"loss": abs(s["loss"] / s["normalizer"] - ref["expected_loss"]) / max(
            1.0, abs(ref["expected_loss"]))}
        report.update(grad_report(full, ref["expected_grads"]))
        Path(args.report).write_text(json.dumps(report, indent=1))
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
