#!/usr/bin/env python
"""Virtual pipeline stages: one training forward/backward over M micro-batches at pp = WORLD_SIZE
with megatron's plain 1F1B schedule (virtual_pp 1, the baseline) against the interleaved schedule
with N chunks per stage, side by side in one run on the same GPT-2-shaped weights and batches
(random; each variant's gradients are checked against the baseline's: they are the same
computation, micro-batch by micro-batch, so the same to the bit).

  torchrun --nproc-per-node 2 tools/bench_virtual_pp.py [--layers 8] [--micro-batches 4]
      [--micro-batch 2] [--seq 128] [--chunks 2,4] [--vocab 50257] [--repeats 3]
      [--threads-per-rank 1]

Prints seconds per forward/backward, the speed-up over the baseline, and the bubble a perfect
schedule would leave: (pp - 1) / (M + pp - 1) of the time without chunks, (pp - 1) / (N * M +
pp - 1) with N chunks (each chunk a 1/N-th of the stage's work). The chunks pay for that with N
times the stage-to-stage messages.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remax_megatron.models.builder import build_chunks  # noqa: E402
from remax_megatron.models.config import ModelConfig  # noqa: E402
from remax_megatron.models.sharding import (  # noqa: E402
    load_full_state_dict, local_shards, seeded_full_weights,
)
from remax_megatron.ops.logprobs import vocab_parallel_log_probs  # noqa: E402
from remax_megatron.runtime.distributed import init_runtime, shutdown  # noqa: E402
from remax_megatron.training.engine import forward_backward, wrap_ddp  # noqa: E402
from bench_pipeline_rollout import timed  # noqa: E402  (this directory: a barrier-timed call)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257,
                        help="a small one balances the stages (the last one holds the vocabulary "
                             "projection, the bulk of GPT-2's work per token)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--chunks", default="2,4", help="chunks per stage to compare with 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="CPU: torch threads per rank (2 ranks on 2 cores: 1)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads_per_rank)
    pp = int(os.environ.get("WORLD_SIZE", "1"))
    runtime = init_runtime(tp=1, pp=pp)
    config = ModelConfig.gpt2(num_layers=args.layers, hidden_size=768, num_attention_heads=12,
                              vocab_size=args.vocab, max_position_embeddings=1024)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": ids.to(runtime.device),
                "position_ids": torch.arange(args.seq).expand(args.micro_batch, -1)
                .to(runtime.device)}
               for ids in torch.randint(0, config.vocab_size, (args.micro_batches,
                                                               args.micro_batch, args.seq),
                                        generator=g)]

    def loss_fn(output, batch):
        lp = vocab_parallel_log_probs(output[:, :-1], batch["input_ids"][:, 1:],
                                      config.vocab_size)
        return -lp.sum(), torch.tensor(lp.numel(), dtype=torch.int), {}

    variants = [1] + [int(v) for v in args.chunks.split(",") if v]
    models, grads = {}, {}
    for vpp in variants:
        chunks = build_chunks(config, vpp, perform_initialization=False)
        for chunk in chunks:
            load_full_state_dict(chunk, seeded_full_weights(chunk, 1))
        models[vpp] = wrap_ddp([chunk.to(runtime.device) for chunk in chunks])

    def step(vpp):
        return lambda: forward_backward(models[vpp], batches, loss_fn, seq_length=args.seq,
                                        micro_batch_size=args.micro_batch)

    runs = {vpp: [] for vpp in variants}
    for vpp in variants:
        step(vpp)()  # warm-up; its gradients (every stage's, by global name) are compared below
        mine = {}
        for chunk in models[vpp]:
            mine.update(local_shards(chunk, {n: p.main_grad for n, p in
                                             chunk.module.named_parameters()}))
        everyone = [None] * dist.get_world_size()
        # clones: a gradient is a view of DDP's whole buffer, which pickling would copy each time
        dist.all_gather_object(everyone, {n: s["tensor"].clone() for n, s in mine.items()})
        grads[vpp] = {n: t for part in everyone for n, t in part.items()}
    for _ in range(args.repeats):
        for vpp in variants:  # alternate, so machine load hits every variant alike
            runs[vpp].append(timed(step(vpp), runtime.device))
    worst = max([(grads[vpp][name] - grads[1][name]).abs().max().item()
                 for vpp in variants[1:] for name in grads[1]], default=0.0)
    scale = max(t.abs().max().item() for t in grads[1].values())
    if dist.get_rank() == 0:
        m = args.micro_batches
        print(f"pp={pp}, GPT-2 shape with {args.layers} layers and {args.vocab} ids, "
              f"{runtime.device}, {m} micro-batches"
              f" of {args.micro_batch} x {args.seq} tokens, forward + backward, median of "
              f"{args.repeats}; gradients vs the baseline: max |diff| {worst:.1e} (largest entry "
              f"{scale:.1e})")
        base = statistics.median(runs[1])
        for vpp, times in runs.items():
            t = statistics.median(times)
            label = "1 chunk per stage (baseline)" if vpp == 1 else f"{vpp} chunks per stage"
            bubble = (pp - 1) / (vpp * m + pp - 1)
            print(f"  {label:30s}: {t:6.2f}s  speed-up {base / t:.2f}x  "
                  f"(ideal bubble {100 * bubble:.0f}%)")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
