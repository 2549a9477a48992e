"""The metrics sinks: metrics.jsonl (truncated to the resumed step), TensorBoard scalars, W&B
(through a stand-in module: wandb is not a dependency), and the reward plot."""

import json
import sys
import types

import pytest

from remax_megatron.training.metrics import MetricsLogger


def step_metrics(step: int) -> dict:
    return {"step": step, "reward/sampled": 0.1 * step, "reward/greedy": 0.05 * step,
            "advantage/mean": 0.0, "advantage/std": 1.0, "response_length/sampled": 4.0,
            "kl": 0.0, "entropy": 2.0, "grad_norm": 0.5, "lr": 1e-3, "time/step": 1.0,
            "time/rollout": 0.5, "time/reward": 0.1, "time/train": 0.4,
            "tokens_per_second": 100.0, "skipped": False}


class FakeWandb:
    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def finish(self):
        self.finished += 1


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_tensorboard_wandb_and_plot(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake.init))
    logger = MetricsLogger(tmp_path, total_steps=3, wandb_project="proj", config={"a": 1})
    for step in (1, 2, 3):
        logger.log(step_metrics(step))
    plot = logger.close()

    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert fake.inits == [{"project": "proj", "config": {"a": 1}, "dir": str(tmp_path)}]
    assert [step for step, _ in fake.logged] == [1, 2, 3]
    assert fake.logged[2][1]["reward/sampled"] == pytest.approx(0.3)
    assert fake.finished == 1
    assert plot is not None and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("reward/sampled")
    assert [(e.step, round(e.value, 6)) for e in scalars] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert "step" not in events.Tags()["scalars"]


def test_resume_keeps_steps_up_to_the_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, total_steps=4, tensorboard=False)
    for step in (1, 2, 3):
        first.log(step_metrics(step))
    first.close(plot=False)

    resumed = MetricsLogger(tmp_path, total_steps=4, tensorboard=False, resume_from_step=2)
    resumed.log(step_metrics(3))
    resumed.log(step_metrics(4))
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [m["step"] for m in resumed.history] == [1, 2, 3, 4]

    fresh = MetricsLogger(tmp_path, total_steps=4, tensorboard=False)
    assert not (tmp_path / "metrics.jsonl").exists() and fresh.history == []


def test_missing_wandb_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    logger = MetricsLogger(tmp_path, total_steps=1, tensorboard=False, wandb_project="proj")
    assert logger.wandb is None
    assert "pip install wandb" in caplog.text
    logger.log(step_metrics(1))
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["step"] == 1
