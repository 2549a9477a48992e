#!/usr/bin/env python
"""Rollout under pipeline parallelism: the whole batch stage after stage (pipeline_micro_batches=1,
the baseline) against prompt groups that follow each other through the stages (0: the automatic
default, prefill in 2 x pp groups; N: N groups for prefill and decode), side by side in one run,
on a GPT-2-124M-shaped policy with random weights and a ReMax (greedy + sampled) pair.

  torchrun --nproc-per-node 2 tools/bench_pipeline_rollout.py [--batch 16] [--prompt-len 128]
      [--new-tokens 32] [--groups 0,2,4] [--repeats 3] [--threads-per-rank 1]

Prints seconds per call and the speed-up over the baseline for each setting. Groups overlap the
stages' work, and pay when a stage's forward is compute-bound (prefill, large batches); a
memory-bound decode step re-reads the stage's weights once per group.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remax_megatron.models.builder import build_policy  # noqa: E402
from remax_megatron.models.config import ModelConfig  # noqa: E402
from remax_megatron.rollout.engine import generate  # noqa: E402
from remax_megatron.rollout.sampling import GREEDY, SamplingParams  # noqa: E402
from remax_megatron.runtime.distributed import init_runtime, shutdown  # noqa: E402


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--groups", default="0,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="CPU: torch threads per rank (2 ranks on 2 cores: 1)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads_per_rank)
    runtime = init_runtime(tp=1, pp=int(os.environ.get("WORLD_SIZE", "1")))
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    config = ModelConfig.gpt2(num_layers=12, hidden_size=768, num_attention_heads=12,
                              vocab_size=50257, max_position_embeddings=1024)
    model = build_policy(config, params_dtype=dtype).to(runtime.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=g)
    mask = torch.ones_like(ids)
    pair = (GREEDY, SamplingParams(temperature=1.0, top_p=0.9))

    def call(groups):
        return lambda: generate(model, ids, mask, continuations=pair,
                                max_new_tokens=args.new_tokens, pipeline_micro_batches=groups)

    counts = [int(c) for c in args.groups.split(",")]
    runs = {c: [] for c in [1, *counts]}
    for count in runs:
        call(count)()  # warm-up
    for _ in range(args.repeats):
        for count in runs:  # alternate, so machine load hits every variant alike
            runs[count].append(timed(call(count), runtime.device))
    if dist.get_rank() == 0:
        print(f"pp={dist.get_world_size()}, GPT-2 124M shape, {args.dtype}, {runtime.device}, "
              f"batch {args.batch} prompts x 2 (ReMax pair), prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens, median of {args.repeats}")
        base = statistics.median(runs[1])
        for count, times in runs.items():
            t = statistics.median(times)
            label = {1: "whole batch (baseline)", 0: "auto (prefill groups)"}.get(
                count, f"{count} prompt groups")
            print(f"  {label:24s}: {t:6.2f}s  speed-up {base / t:.2f}x")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
