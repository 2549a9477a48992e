"""Step metrics on rank 0: a progress line, DIR/metrics.jsonl (one object per step), TensorBoard
(and W&B when configured), and at the end a PNG of the reward curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

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
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, output_dir: Path, total_steps: int, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None,
                 resume_from_step: int = 0):
        self.dir = Path(output_dir)
        self.total = total_steps
        self.path = self.dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.algorithm = ((config or {}).get("algorithm") or {}).get("name", "remax")
        if resume_from_step and self.path.is_file():
            # keep the steps the resumed checkpoint had already done; later ones are redone
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line]
            self.history = [m for m in kept if m["step"] <= resume_from_step]
        elif self.path.exists():
            self.path.unlink()
        self.path.write_text("".join(json.dumps(m) + "\n" for m in self.history))
        self.tb = self._tensorboard() if tensorboard else None
        self.wandb = self._wandb(wandb_project, config) if wandb_project else None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
            return None
        return SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def _wandb(self, project, config):
        try:
            import wandb
        except ImportError:
            log.warning("log.wandb_project is set but wandb is not installed: pip install wandb")
            return None
        return wandb.init(project=project, config=config, dir=str(self.dir))

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        log.info(progress_line(metrics, self.total))
        step = metrics["step"]
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(key, value, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self, plot: bool = True) -> Path | None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return (plot_rewards(self.history, self.dir / "reward_curves.png", self.algorithm)
                if plot else None)


def plot_rewards(history: list[dict], path: Path, algorithm: str = "remax") -> Path | None:
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no reward plot (pip install matplotlib)")
        return None
    steps = [m["step"] for m in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [m["reward/sampled"] for m in history], label="sampled response (trained)")
    if "reward/greedy" in history[-1]:
        ax.plot(steps, [m["reward/greedy"] for m in history], label="greedy response (baseline)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(f"{algorithm}: mean reward per step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
