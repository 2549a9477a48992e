#!/usr/bin/env python
"""Generation speed: our KV-cached decode loop against transformers' generate (its KV cache),
same GPT-2-124M-shaped model with random weights, same prompts and lengths, side by side in
one process; and the ReMax pair (greedy + sampled sharing one prefill) against two separate calls.

  python tools/bench_generate.py [--batch 16] [--prompt-len 64] [--new-tokens 64] [--repeats 3]
                                 [--dtype fp32|bf16] [--device cpu|cuda] [--batches 1,16,64]

Prints tokens/s of each and the ratio ours / transformers (goal >= 1.5x; first milestone 1.0x).
On CUDA it also prints decode tokens/s per batch size and the fraction of the memory-bandwidth
roofline (weight bytes / HBM bandwidth per decode step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remax_megatron.convert.commands import hf_to_mcore  # noqa: E402
from remax_megatron.models.checkpoint import load_model  # noqa: E402
from remax_megatron.rollout.engine import generate  # noqa: E402
from remax_megatron.rollout.sampling import GREEDY, SamplingParams  # noqa: E402
from remax_megatron.runtime.distributed import init_runtime  # noqa: E402

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _once(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _time(fn, repeats, device) -> float:
    fn()  # warm-up
    return statistics.median(_once(fn, device) for _ in range(repeats))


def _side_by_side(a, b, repeats, device) -> tuple[float, float, float]:
    """Alternate a and b so that load on the machine hits both alike: (median a, median b,
    median of the per-pair ratios a / b)."""
    a(), b()  # warm-up
    pairs = [(_once(a, device), _once(b, device)) for _ in range(repeats)]
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[0] / p[1] for p in pairs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="", help="CUDA roofline table, e.g. 1,16,64")
    args = parser.parse_args()

    import transformers

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    device = torch.device(args.device)
    config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    hf.save_pretrained(work / "hf")
    hf_to_mcore(work / "hf", work / "mcore", dtype=args.dtype)
    hf = hf.to(device=device, dtype=dtype)

    init_runtime(tp=1, pp=1)
    ours, _ = load_model(work / "mcore")
    ours = ours.to(device)
    params = sum(p.numel() for p in hf.parameters())
    print(f"model: GPT-2 124M shape ({params / 1e6:.0f}M parameters), {args.dtype}, {device}, "
          f"torch threads {torch.get_num_threads()}")

    def prompts(batch):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g)
        return ids.to(device), torch.ones_like(ids).to(device)

    ids, mask = prompts(args.batch)
    n = args.new_tokens

    def run_hf():
        hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                    pad_token_id=0)

    def run_ours(continuations=(GREEDY,), batch=(ids, mask), new_tokens=n):
        return generate(ours, *batch, continuations=continuations, max_new_tokens=new_tokens,
                        vocab_size=config.vocab_size)

    t_hf, t_ours, ratio = _side_by_side(run_hf, run_ours, args.repeats, device)
    tokens = args.batch * n
    print(f"batch {args.batch}, prompt {args.prompt_len}, {n} new tokens (greedy), median of "
          f"{args.repeats}:")
    print(f"  transformers generate : {tokens / t_hf:8.1f} tokens/s ({t_hf:.2f}s)")
    print(f"  remax-megatron        : {tokens / t_ours:8.1f} tokens/s ({t_ours:.2f}s)")
    print(f"  ratio ours / transformers: {ratio:.2f}x (median of paired runs; goal >= 1.5x)")

    sampled = SamplingParams(temperature=1.0, top_p=0.9)
    t_apart, t_pair, saving = _side_by_side(
        lambda: (run_ours((GREEDY,)), run_ours((sampled,))),
        lambda: run_ours((GREEDY, sampled)), args.repeats, device)
    print(f"ReMax pair (greedy + sampled, one shared prefill): {t_pair:.2f}s vs two separate "
          f"calls {t_apart:.2f}s: {saving:.2f}x faster")

    if args.batches and device.type == "cuda":
        name = torch.cuda.get_device_name()
        bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
        print(f"decode roofline on {name}: weight bytes {weight_bytes / 1e6:.0f} MB per step")
        for batch in [int(b) for b in args.batches.split(",")]:
            data = prompts(batch)
            short = _time(lambda d=data: run_ours(batch=d, new_tokens=2), args.repeats, device)
            full = _time(lambda d=data: run_ours(batch=d), args.repeats, device)
            per_step = (full - short) / (n - 2)
            frac = (weight_bytes / bandwidth) / per_step if bandwidth else float("nan")
            print(f"  batch {batch:3d}: decode {batch / per_step:9.1f} tokens/s, "
                  f"{per_step * 1e3:.2f} ms/step, roofline fraction {frac:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
