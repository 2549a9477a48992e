#!/usr/bin/env python
"""Peak memory of `convert hf-to-mcore` (and `mcore-to-hf`) on a synthetic ~1B-parameter Llama.

Writes a random Llama checkpoint (GQA, untied, bf16 by default) as sharded safetensors, then runs
each conversion in a child process while sampling the memory of that process tree, and prints
peak memory as a ratio to the checkpoint's size on disk (goal: at most 1.3x).

  python tools/bench_convert_memory.py [--workdir DIR] [--dtype bf16|fp32] [--layers 18] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remax_megatron.convert import llama, rules  # noqa: E402
from remax_megatron.convert.hf_files import ShardedSafetensorsWriter  # noqa: E402
from remax_megatron.models.config import ModelConfig  # noqa: E402
from remax_megatron.models.hf_config import HFModelInfo, to_hf_config  # noqa: E402


def synthesize(directory: Path, layers: int, dtype: torch.dtype) -> ModelConfig:
    config = ModelConfig.llama(num_layers=layers, hidden_size=2048, num_attention_heads=16,
                               num_key_value_heads=8, ffn_hidden_size=5632, vocab_size=32000,
                               max_position_embeddings=4096)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = rules.planned_shapes(llama, config, reward=False)
    writer = ShardedSafetensorsWriter(directory, {n: (s, dtype) for n, s in shapes.items()},
                                      max_shard_bytes=2**30)
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, (0.02 * torch.randn(shape, generator=g)).to(dtype))
    writer.finish()
    info = HFModelInfo(config, "LlamaForCausalLM", "llama", False)
    (directory / "config.json").write_text(json.dumps(to_hf_config(info), indent=2))
    return config


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS of the main process, summed PSS of it and its children): PSS splits shared pages,
    so forked writer processes are not double counted."""
    rss = proc.memory_info().rss
    pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            pss += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def measure(cmd: list[str]) -> dict:
    start = time.time()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(child.pid)
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                rss, pss = _tree_memory(proc)
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
    return {**peak, "seconds": time.time() - start, "log": output}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    hf_dir, mc_dir, back_dir = work / "hf", work / "mcore", work / "back"
    try:
        t = time.time()
        config = synthesize(hf_dir, args.layers, dtype)
        size = _size(hf_dir)
        params = sum(torch.Size(s).numel()
                     for s in rules.planned_shapes(llama, config, False).values())
        print(f"synthetic Llama: {params / 1e9:.2f}B parameters, {args.dtype}, "
              f"{size / 2**30:.2f} GiB on disk ({time.time() - t:.0f}s to write)")
        base = measure([sys.executable, "-c", "import torch, megatron.core, "
                        "remax_megatron.convert.commands"])
        print(f"baseline: python + torch + megatron-core imported: {base['rss'] / 2**30:.2f} GiB "
              "RSS")
        cli = [sys.executable, "-m", "remax_megatron", "convert"]
        rows = []
        for label, cmd in (
            ("hf-to-mcore", cli + ["hf-to-mcore", "--hf", str(hf_dir), "--out", str(mc_dir)]),
            ("mcore-to-hf", cli + ["mcore-to-hf", "--load", str(mc_dir), "--out", str(back_dir)]),
        ):
            r = measure(cmd)
            rows.append((label, r))
        print(f"{'step':<12} {'seconds':>8} {'peak RSS':>10} {'peak PSS tree':>14} "
              f"{'RSS / ckpt':>11} {'PSS / ckpt':>11}")
        for label, r in rows:
            print(f"{label:<12} {r['seconds']:>8.1f} {r['rss'] / 2**30:>9.2f}G "
                  f"{r['pss'] / 2**30:>13.2f}G {r['rss'] / size:>10.2f}x {r['pss'] / size:>10.2f}x")
        print(f"goal: peak memory at most 1.3x the checkpoint ({1.3 * size / 2**30:.2f} GiB)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
