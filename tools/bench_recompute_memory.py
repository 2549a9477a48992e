#!/usr/bin/env python
"""Memory saved by activation recompute (train.recompute) on the GPT-2-124M shape.

One training forward/backward of a micro-batch (default 4 x 128 tokens: the model's logits, the
vocab-parallel log-probs of the next tokens, their sum as the loss), once per recompute mode, each
in a fresh child process, side by side. Gradients accumulate into buffers allocated beforehand (as
megatron DDP's are), so what is measured is activations and temporaries:

- saved activations: bytes of the distinct storages autograd holds for the backward at the end of
  the forward (torch.autograd.graph.saved_tensors_hooks; megatron's checkpoints save their inputs
  through the same mechanism), split into the transformer layers' share and the rest (the
  embedding and the output layer / log-softmax, which no recompute mode touches);
- live after the forward: tensor memory held when the loss is computed (activations, logits);
- peak tensor memory: the largest sum of live tensor storages during forward + backward, tracked
  by torch's MemTracker (a dispatch mode), minus what was live before (weights, gradients);
- peak RSS: the child's peak resident memory during forward + backward minus its RSS before it
  (allocator caching makes this the coarsest of the three).

  python tools/bench_recompute_memory.py [--batch 4] [--seq 128] [--layers 12] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("none", "selective", "full")
MIB = 2**20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(mode: str, batch: int, seq: int, layers: int) -> dict:
    import torch

    from remax_megatron.models.builder import build_policy
    from remax_megatron.models.config import ModelConfig
    from remax_megatron.ops.logprobs import vocab_parallel_log_probs
    from remax_megatron.runtime.distributed import init_runtime

    init_runtime(tp=1, pp=1, seed=1234)
    config = ModelConfig.gpt2(num_layers=layers, hidden_size=768, num_attention_heads=12,
                              vocab_size=50257, max_position_embeddings=1024)
    model = build_policy(config, recompute=mode).train()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    positions = torch.arange(seq).expand(batch, seq)

    # storages autograd keeps for the backward, keyed by data pointer (views share one)
    saved_in_layers: dict = {}
    saved_elsewhere: dict = {}
    where = {"layers": False}
    decoder = model.decoder
    decoder.register_forward_pre_hook(lambda *a: where.__setitem__("layers", True))
    decoder.register_forward_hook(lambda *a: where.__setitem__("layers", False))

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in weights:
            return tensor  # a weight kept for the backward is no activation
        table = saved_in_layers if where["layers"] else saved_elsewhere
        table[storage.data_ptr()] = storage.nbytes()
        return tensor

    at_end_of_forward = {}

    def step():
        logits = model(ids, positions, None)
        loss = -vocab_parallel_log_probs(logits[:, :-1], ids[:, 1:], config.vocab_size).sum()
        at_end_of_forward.update(layers=sum(saved_in_layers.values()),
                                 other=sum(saved_elsewhere.values()),
                                 live=tracker.get_tracker_snapshot("current").get(
                                     cpu, {}).get("Total", 0))
        loss.backward()

    from torch.distributed._tools.mem_tracker import MemTracker

    cpu = torch.device("cpu")
    tracker = MemTracker()
    tracker.track_external(model)
    sampler = _RssSampler()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
        live_before = tracker.get_tracker_snapshot("current").get(cpu, {}).get("Total", 0)
        with sampler:
            step()
    peak_tensor = tracker.get_tracker_snapshot("peak").get(cpu, {}).get("Total", 0)
    return {"mode": mode, "saved_layers": at_end_of_forward["layers"],
            "saved_other": at_end_of_forward["other"],
            "live_after_forward": at_end_of_forward["live"] - live_before,
            "peak_tensor": peak_tensor - live_before,
            "peak_rss": sampler.peak - sampler.start,
            "grads_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())}


class _RssSampler:
    """The process's RSS when entered and its peak while inside (sampled every millisecond)."""

    def __enter__(self):
        import threading

        self.start = self.peak = _rss_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now())
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--json")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.layers)))
        return 0
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    rows = []
    for mode in MODES:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", mode, "--batch", str(args.batch), "--seq",
             str(args.seq), "--layers", str(args.layers)],
            env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"GPT-2-124M shape ({args.layers} layers, hidden 768, 12 heads, vocab 50257), one "
          f"forward/backward of {args.batch} x {args.seq} tokens, fp32 on CPU, MiB:")
    print(f"{'recompute':<10} {'saved: layers':>14} {'saved: other':>13} "
          f"{'live after fwd':>15} {'peak tensors':>13} {'peak RSS':>9}")
    for r in rows:
        print(f"{r['mode']:<10} {r['saved_layers'] / MIB:>14.1f} {r['saved_other'] / MIB:>13.1f} "
              f"{r['live_after_forward'] / MIB:>15.1f} {r['peak_tensor'] / MIB:>13.1f} "
              f"{r['peak_rss'] / MIB:>9.1f}")
    base = rows[0]
    for r in rows[1:]:
        saved = base["saved_layers"] - r["saved_layers"]
        live = base["live_after_forward"] - r["live_after_forward"]
        peak = base["peak_tensor"] - r["peak_tensor"]
        print(f"{r['mode']}: the layers keep {saved / MIB:.1f} MiB less for the backward "
              f"({saved / base['saved_layers']:.0%}); live after the forward {live / MIB:.1f} MiB "
              f"less; peak {peak / MIB:.1f} MiB lower ({peak / base['peak_tensor']:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
