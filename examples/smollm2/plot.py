"""Held-out greedy accuracy of finished runs against steps and minutes, one PNG.

    python examples/smollm2/plot.py runs/smollm2-remax runs/smollm2-grpo --out curves.png

Each run directory's eval.jsonl gives the accuracy; its metrics.jsonl the seconds per step (the
wall-clock axis counts training steps only, not the evaluations). A label is the directory's name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(run: Path) -> tuple[list[int], list[float], list[float]]:
    """(steps, training minutes at each step, accuracy) of one run's evaluations."""
    for name in ("eval.jsonl", "metrics.jsonl"):
        if not (run / name).is_file():
            raise SystemExit(f"{run}: no {name}: give the output_dir of a finished run")
    evals = read_jsonl(run / "eval.jsonl")
    seconds, clock = {0: 0.0}, 0.0
    for row in read_jsonl(run / "metrics.jsonl"):
        clock += row.get("time/step", 0.0)
        seconds[row["step"]] = clock
    steps = [e["step"] for e in evals]
    return steps, [seconds.get(s, clock) / 60 for s in steps], [e["eval/reward"] for e in evals]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("curves.png"))
    p.add_argument("--title", default="SmolLM2-135M-Instruct, held-out greedy accuracy")
    p.add_argument("--steps-only", action="store_true",
                   help="no wall-clock panel (for runs that shared the machine)")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 if a.steps_only else 2, figsize=(6 if a.steps_only else 11, 4),
                             sharey=True, squeeze=False)
    by_step, by_time = axes[0][0], (None if a.steps_only else axes[0][1])
    for run in a.runs:
        steps, minutes, accuracy = curve(run)
        by_step.plot(steps, accuracy, marker="o", label=run.name)
        if by_time is not None:
            by_time.plot(minutes, accuracy, marker="o", label=run.name)
            by_time.set_xlabel("training minutes (evaluations excluded)")
    by_step.set_xlabel("step")
    by_step.set_ylabel("accuracy")
    by_step.legend(fontsize=8)
    fig.suptitle(a.title)
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
