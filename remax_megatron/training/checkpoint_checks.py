"""What a training checkpoint must be for a run to resume from it, checked before any model is
built: trainer_state.json, every model's metadata, config and weight / optimizer indexes, and
the saved models against this run's. One-line ConfigErrors that name the file and, for a
resume, the checkpoint to use instead."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from ..config_io import ConfigError
from ..models.checkpoint import META_FILE, WEIGHTS_DIR, read_checkpoint
from ..models.dcp_reader import check_weights, one_line
from ..models.locate import complete_steps

OPTIMIZER_DIR = "optimizer"
STATE_FILE = "trainer_state.json"
LATEST = "latest"


def check_training_checkpoint(path: Path, model_config=None, extra_configs=None) -> dict:
    """Everything about a training checkpoint that can be checked before a model is built:
    trainer_state.json, the policy's metadata and config, every weights and optimizer directory
    (present, indexes readable, shards long enough, nothing to unpickle), and, when given, that
    the saved model configs equal this run's (``extra_configs``: {subdirectory: ModelConfig}).
    One-line ConfigErrors that name the file and, for a resume, the checkpoint to use instead.
    Returns the trainer state."""
    path = Path(path)
    parts = {"": model_config, **(extra_configs or {})}
    saved = {}
    try:
        state = read_trainer_state(path)
        for sub in (p.name for p in sorted(path.iterdir()) if (p / META_FILE).is_file()):
            parts.setdefault(sub, None)  # a critic/ this run may not use: check it anyway
        for sub in parts:
            if sub and not (path / sub).is_dir():
                continue  # load_training_checkpoint says what a missing critic/ means
            saved[sub] = read_checkpoint(path / sub)
            check_weights(path / sub / WEIGHTS_DIR)
            check_weights(path / sub / OPTIMIZER_DIR)
    except ConfigError as err:  # damaged: an earlier checkpoint may do
        raise ConfigError(f"{err}{_instead(path)}") from None
    for sub, expected in parts.items():
        if expected is not None and sub in saved:
            _same_model(saved[sub].path, saved[sub].config, expected, sub or "policy")
    return state


def _same_model(path: Path, saved, expected, what: str) -> None:
    from ..models.checkpoint import CONFIG_FILE

    diffs = [(f.name, getattr(saved, f.name), getattr(expected, f.name)) for f in fields(saved)
             if f.name != "init_method_std" and getattr(saved, f.name) != getattr(expected, f.name)]
    if diffs:
        key, was, now = diffs[0]
        more = f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
        raise ConfigError(f"{path / CONFIG_FILE} has {key}={was!r} but this run's {what} has "
                          f"{key}={now!r}{more}: resume with the model settings the checkpoint "
                          "was saved with, or start a new output_dir")


def _instead(path: Path) -> str:
    """For a resume: the newest complete checkpoint before ``path`` (and how to use it)."""
    root = path.parent
    earlier = [p for step, p in complete_steps(root) if p != path]
    if not earlier or not (root / LATEST).exists():
        return ""
    return f" (to resume from {earlier[-1].name} instead, write that name into {root / LATEST})"


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json (step, data position, schedule, settings)."""
    state_file = Path(path) / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{state_file} cannot be read ({one_line(err)}): the checkpoint is "
                          "damaged; resume from an earlier one (point checkpoints/latest at "
                          "it)") from None
    problem = _state_problem(state)
    if problem:
        raise ConfigError(f"{state_file} {problem}: the checkpoint is damaged; resume from an "
                          "earlier one (point checkpoints/latest at it)")
    return state


def _state_problem(state) -> str | None:
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a JSON object"
    checks = {"step": lambda v: isinstance(v, int) and v >= 0,
              "loader": lambda v: isinstance(v, list) and len(v) == 2
              and all(isinstance(x, int) for x in v),
              "scheduler": lambda v: isinstance(v, dict)}
    for key, ok in checks.items():
        if key not in state:
            return f"lacks {key!r}"
        if not ok(state[key]):
            return f"has an invalid {key!r} ({json.dumps(state[key])[:60]})"
    return None
