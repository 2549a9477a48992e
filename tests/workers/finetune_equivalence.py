"""Multi-rank worker: SFT's or reward-model training's loss and gradients on one global batch (the
whole data file) through the run's own micro-batching, loss and megatron's schedule, gathered to
full tensors for comparison with a single-process transformers computation.

  torchrun --nproc-per-node N finetune_equivalence.py --ref REF.pt --report OUT.json [--tp --pp]

The reference holds the kind (sft / rm), the checkpoint, the data file and its row count, the
expected loss and the expected gradients under checkpoint names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from remax_megatron.training.engine import forward_backward
from remax_megatron.training.finetune_config import RMConfig, SFTConfig, load_finetune_config
from remax_megatron.training.reward_training import RewardModelRun
from remax_megatron.training.sft import SFTRun
from worker_io import gather_full_grads, grad_report, layout_parser


def main() -> int:
    parser = layout_parser()
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    ref = torch.load(args.ref, weights_only=False)
    sft = ref["kind"] == "sft"
    cfg = load_finetune_config(SFTConfig if sft else RMConfig, None, [
        f"policy.load={ref['checkpoint']}", f"data.path={ref['data']}",
        f"data.eval_path={ref['eval']}",
        f"parallel.tp={args.tp}", f"parallel.pp={args.pp}",
        f"parallel.sequence_parallel={str(args.sequence_parallel).lower()}",
        f"train.global_batch_size={ref['rows']}", "train.micro_batch_size=2",
        f"output_dir={Path(args.report).parent / 'run'}", "log.tensorboard=false"])
    run = (SFTRun if sft else RewardModelRun)(cfg)
    rows = run._mine(list(run.loader.prompts))  # the whole file: one global batch
    batches, width = run.micro_batches(rows, [1.0] * len(rows))
    run._sums = torch.zeros(len(run.STATS), dtype=torch.float64, device=run.device)
    for chunk in run.ddp:
        chunk.train()
    forward_backward(run.ddp, batches, run._loss, seq_length=width, micro_batch_size=2)
    sums = run._global_sums()
    full = gather_full_grads(run.ddp, Path(args.report).parent, run.trained.config.vocab_size)
    held_out = run.evaluate()  # 5 rows: at dp2 one rank adds a filler of weight 0
    if dist.get_rank() == 0:
        metrics = run.describe(sums)
        report = {"loss": abs(metrics["loss"] - ref["expected_loss"]),
                  "rows": sums["pairs" if not sft else "tokens"]}
        if not sft:
            report["accuracy"] = abs(metrics["accuracy"] - ref["expected_accuracy"])
        for key, want in ref["expected_eval"].items():
            report[f"eval/{key}"] = abs(held_out[f"eval/{key}"] - want)
        report.update(grad_report(full, ref["expected_grads"]))
        Path(args.report).write_text(json.dumps(report, indent=1))
    run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
