"""How far a mixture-of-experts policy's training forwards stray from its rollout, and how much
Rollout Routing Replay (rollout.routing_replay) brings back: the built-in demo in bf16 (and fp32)
with a dense policy, an MoE policy (4 experts of 64, top-2) and the MoE policy with replay, side by
side in one run. Prints per configuration the mean over steps of ``logprob_mismatch`` (|rollout
log-prob - training log-prob| per trained token) and ``moe/routing_mismatch`` (share of tokens
whose experts differ).

    python tools/bench_routing_replay.py [--steps 10] [--dtype bf16,fp32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MOE = ["policy.model.num_experts=4", "policy.model.moe_ffn_hidden_size=64"]
CONFIGS = {"dense": [], "moe": MOE, "moe + replay": [*MOE, "rollout.routing_replay=true"]}


def run(directory: Path, args: list[str]) -> list[dict]:
    subprocess.run([sys.executable, "-m", "remax_megatron", "train", "--output-dir",
                    str(directory), *args], check=True, capture_output=True)
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="bf16,fp32")
    args = parser.parse_args()
    common = [f"train.steps={args.steps}", "train.global_batch_size=16",
              "train.micro_batch_size=8", "rollout.max_new_tokens=16", "train.lr=1e-3"]
    print(f"{'dtype':5} {'policy':13} {'logprob_mismatch':>17} {'routing_mismatch':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype.split(","):
            for name, extra in CONFIGS.items():
                rows = run(Path(tmp) / f"{dtype}-{name.replace(' ', '')}",
                           [*common, f"train.dtype={dtype}", *extra])
                mean = lambda key: (sum(r[key] for r in rows) / len(rows)
                                    if key in rows[0] else float("nan"))
                print(f"{dtype:5} {name:13} {mean('logprob_mismatch'):17.3e} "
                      f"{mean('moe/routing_mismatch'):17.5f}", flush=True)


if __name__ == "__main__":
    main()
