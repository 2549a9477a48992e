"""What a user watches, on rank 0: a progress line per step (with an ETA), DIR/metrics.jsonl (one
object per step), sample responses (DIR/samples.jsonl), held-out evaluations (DIR/eval.jsonl),
TensorBoard (and W&B when configured), and at the end a PNG of the reward curves."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config_io import atomic_write_text

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(m: dict, total: int) -> str:
    """One line per step; parts for what this algorithm logs (greedy baseline, critic)."""
    parts = [f"step {m['step']}/{total}", f"reward {m['reward/sampled']:.4f}"]
    if "reward/greedy" in m:
        parts[-1] += f" (greedy {m['reward/greedy']:.4f})"
    parts += [f"adv {m['advantage/mean']:+.4f}±{m['advantage/std']:.4f}",
              f"len {m['response_length/sampled']:.1f}", f"kl {m['kl']:.4f}",
              f"ent {m['entropy']:.3f}", f"gnorm {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}"]
    if "critic/value_loss" in m:
        parts.append(f"vloss {m['critic/value_loss']:.4f}")
    spans = [f"rollout {m['time/rollout']:.1f}", f"reward {m['time/reward']:.1f}"]
    if m.get("time/critic"):
        spans.append(f"critic {m['time/critic']:.1f}")
    spans.append(f"train {m['time/train']:.1f}")
    parts += [f"{m['time/step']:.1f}s ({', '.join(spans)})",
              f"{m['tokens_per_second']:.0f} tok/s"]
    if "eval/reward" in m:
        parts.append(f"eval {m['eval/reward']:.4f}")
    return " | ".join(parts)


def sample_lines(step: int, samples: list[dict]) -> list[str]:
    """A few prompts with their responses and rewards, as log lines."""
    lines = [f"samples at step {step}:"]
    for number, s in enumerate(samples, start=1):
        lines.append(f"  [{number}] prompt: {s['prompt']!r}")
        if "greedy" in s:
            lines.append(f"      greedy  {s['greedy']['reward']:+.4f}: {s['greedy']['response']!r}")
        for r in s["sampled"]:
            lines.append(f"      sampled {r['reward']:+.4f}: {r['response']!r}")
    return lines


def samples_markdown(samples: list[dict]) -> str:
    """The same for TensorBoard's text tab (markdown)."""
    rows = ["| prompt | response | kind | reward |", "| --- | --- | --- | --- |"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for s in samples:
        answers = ([("greedy", s["greedy"])] if "greedy" in s else []) + [
            ("sampled", r) for r in s["sampled"]]
        for kind, r in answers:
            rows.append(f"| {cell(s['prompt'])} | {cell(r['response'])} | {kind} | "
                        f"{r['reward']:.4f} |")
    return "\n".join(rows)


def _read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file; a last line cut short (a kill or a full disk mid-append) is
    dropped: its step is redone."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            log.warning("%s: dropped an unreadable line (%r...)", path, line[:40])
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class JsonLines:
    """DIR/NAME.jsonl, one object per line with a "step"; a resumed run keeps the lines up to its
    checkpoint's step (later ones are redone), a new one starts the file empty."""

    def __init__(self, path: Path, resume_from_step: int = 0):
        self.path = path
        self.rows = []
        if resume_from_step and path.is_file():
            self.rows = [row for row in _read_rows(path) if row["step"] <= resume_from_step]
            # replaced in one rename: a crash here cannot cost the history
            atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in self.rows))
        elif path.exists():
            path.unlink()  # (the run directory check let a new run start here)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def eval_line(step: int, result: dict) -> str:
    return (f"eval at step {step}: reward {result['eval/reward']:.4f} (greedy responses to "
            f"{result['eval/prompts']} held-out prompts), response length "
            f"{result['eval/response_length']:.1f}")


def reward_plot(history: list[dict], directory: Path, config: dict) -> Path | None:
    algorithm = (config.get("algorithm") or {}).get("name", "remax")
    return plot_rewards(history, directory / "reward_curves.png", algorithm)


@dataclass(frozen=True)
class View:
    """How a kind of training shows itself: its progress line (metrics row, total steps), its
    evaluation line (step, result) and its plot (history, output directory, config) -> path."""

    progress: Callable[[dict, int], str]
    eval_line: Callable[[int, dict], str]
    plot: Callable[[list, Path, dict], Path | None]


RL_VIEW = View(progress_line, eval_line, reward_plot)


class MetricsLogger:
    def __init__(self, output_dir: Path, total_steps: int, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None,
                 resume_from_step: int = 0, view: View | None = None):
        self.dir = Path(output_dir)
        self.total = total_steps
        self.config = config or {}
        self.view = view or RL_VIEW
        self.steps = JsonLines(self.dir / "metrics.jsonl", resume_from_step)
        self.history: list[dict] = self.steps.rows
        self.samples = JsonLines(self.dir / "samples.jsonl", resume_from_step)
        self.evals = JsonLines(self.dir / "eval.jsonl", resume_from_step)
        self.tb = self._tensorboard(resume_from_step) if tensorboard else None
        self.wandb = self._wandb(wandb_project, config) if wandb_project else None
        self._clock = (time.time(), resume_from_step)  # for the ETA: this process's pace

    def _tensorboard(self, resume_from_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
            return None
        # a resumed run drops the events the killed run had logged after its checkpoint
        return SummaryWriter(log_dir=str(self.dir / "tensorboard"),
                             purge_step=resume_from_step + 1 if resume_from_step else None)

    def _wandb(self, project, config):
        try:
            import wandb
        except ImportError:
            log.warning("log.wandb_project is set but wandb is not installed: pip install wandb")
            return None
        return wandb.init(project=project, config=config, dir=str(self.dir))

    def eta(self, step: int) -> float:
        """Seconds left at this process's pace so far."""
        start, first = self._clock
        done = step - first
        return (time.time() - start) / done * (self.total - step) if done > 0 else float("nan")

    def log(self, metrics: dict) -> None:
        self.steps.append(metrics)
        step = metrics["step"]
        line = self.view.progress(metrics, self.total)
        if step < self.total:
            line += f" | eta {format_duration(self.eta(step))}"
        log.info(line)
        self._scalars(metrics, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def _scalars(self, values: dict, step: int) -> None:
        if self.tb is None:
            return
        for key, value in values.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        for s in samples:
            self.samples.append({"step": step, **s})
        for line in sample_lines(step, samples):
            log.info(line)
        if self.tb is not None:
            self.tb.add_text("samples", samples_markdown(samples), step)
            self.tb.flush()

    def log_eval(self, step: int, result: dict) -> None:
        """A held-out evaluation; at step 0 (before training) it has no step metrics to join."""
        self.evals.append({"step": step, **result})
        log.info(self.view.eval_line(step, result))
        if step == 0:
            self._scalars(result, step)

    def close(self, plot: bool = True) -> Path | None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return self.view.plot(self.history, self.dir, self.config) if plot else None


def plot_rewards(history: list[dict], path: Path, algorithm: str = "remax") -> Path | None:
    if not history:
        return None
    steps = [m["step"] for m in history]
    series = {"sampled response (trained)": (steps, [m["reward/sampled"] for m in history])}
    if "reward/greedy" in history[-1]:
        series["greedy response (baseline)"] = (steps, [m["reward/greedy"] for m in history])
    return plot_series(path, f"{algorithm}: mean reward per step", "mean reward", series)


def plot_losses(history: list[dict], directory: Path, config: dict) -> Path | None:
    """SFT's and reward-model training's loss per step, and on the held-out rows."""
    if not history:
        return None
    series = {"training batch": ([m["step"] for m in history], [m["loss"] for m in history])}
    evals = [m for m in history if "eval/loss" in m]
    if evals:
        series["held-out"] = ([m["step"] for m in evals], [m["eval/loss"] for m in evals])
    return plot_series(directory / "loss_curves.png", "loss per step", "loss", series)


def plot_series(path: Path, title: str, ylabel: str, series: dict) -> Path | None:
    """``series``: {label: (steps, values)} as lines against the step, saved as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, (steps, values) in series.items():
        ax.plot(steps, values, label=label, marker="o" if len(steps) < 3 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
