"""From the path a user names (`generate --load`, `convert mcore-to-hf --load`, `policy.load`) to
the checkpoint directory to read.

Accepted: a checkpoint directory itself; a training run directory (OUTPUT); its checkpoints/
directory; or the checkpoints/latest file. The last three resolve to the newest complete training
checkpoint. File-system checks only, so a wrong path fails in milliseconds, before torch loads.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..config_io import ConfigError

log = logging.getLogger(__name__)

# The names models/checkpoint.py and training/checkpointing.py write (repeated here so that this
# module needs no torch; tests/test_locate.py checks they agree).
META_FILE = "remax_checkpoint.json"
WEIGHTS_METADATA = "model/metadata.json"
STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
METRICS_FILE = "metrics.jsonl"  # every training run writes it, checkpoint or not

_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_DIR = re.compile(r"\.step_\d+\.tmp")


def is_step_dir(path: Path) -> bool:
    """A step_N directory (complete or not), as training checkpoints are named."""
    return bool(_STEP_DIR.fullmatch(path.name)) and path.is_dir() and not path.is_symlink()


def is_complete(step_dir: Path) -> bool:
    """A training checkpoint whose save finished: the trainer writes trainer_state.json last,
    inside a .tmp directory that is renamed only once every rank is done."""
    return all((step_dir / name).is_file() for name in (STATE_FILE, META_FILE, WEIGHTS_METADATA))


def complete_steps(checkpoints: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete step_N directory, oldest first; .step_N.tmp ignored."""
    found = []
    try:
        children = list(checkpoints.iterdir())
    except OSError:  # missing or unreadable: none
        return []
    for child in children:
        match = _STEP_DIR.fullmatch(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def newest_complete(checkpoints: Path) -> tuple[Path | None, str]:
    """The checkpoint `latest` names when complete, else the highest complete step_N (None when
    there is none); with the reason, for log lines."""
    pointer = checkpoints / LATEST
    note = f"{pointer.name} is missing"
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""  # a damaged pointer: the newest complete checkpoint below
        if _STEP_DIR.fullmatch(name) and is_complete(checkpoints / name):
            return checkpoints / name, f"named by {pointer.name}"
        note = f"{pointer.name} names {name[:40] or 'nothing'!r}, not a complete checkpoint"
    steps = complete_steps(checkpoints)
    return (steps[-1][1] if steps else None), f"the newest complete checkpoint; {note}"


def _newest(checkpoints: Path, flag: str, named: Path) -> tuple[Path, str]:
    chosen, why = newest_complete(checkpoints)
    if chosen is None:
        raise ConfigError(f"{flag} {named}: {checkpoints} holds no complete checkpoint (no step_N "
                          "with trainer_state.json): wait for the run to save one or name a "
                          "checkpoint directory")
    return chosen, why


def _checkpoints_dir(path: Path) -> Path | None:
    """The checkpoints/ directory that ``path`` is, or is the run directory of, else None."""
    if (path / CHECKPOINTS_DIR).is_dir():
        return path / CHECKPOINTS_DIR
    looks_like_one = path.name == CHECKPOINTS_DIR or (path / LATEST).is_file() or any(
        _STEP_DIR.fullmatch(c.name) or _TMP_DIR.fullmatch(c.name) for c in path.iterdir())
    return path if looks_like_one else None


def resolve_checkpoint(path, flag: str) -> Path:
    """The checkpoint directory that ``path`` (given with ``flag``, e.g. "--load") names.

    A checkpoint directory is returned as it is (read_checkpoint checks its contents); a run
    directory, its checkpoints/ or checkpoints/latest resolve to the newest complete checkpoint,
    with an INFO line saying which. One-line ConfigErrors name ``flag`` and what to change.
    """
    named = Path(path)
    if not named.exists():
        raise ConfigError(f"{flag} {named} does not exist: give a checkpoint directory or a "
                          "training run directory")
    if named.is_file():
        if named.name != LATEST:
            raise ConfigError(f"{flag} {named} is a file: give a checkpoint directory, a training "
                              "run directory or its checkpoints/latest")
        checkpoints = named.parent
    elif _TMP_DIR.fullmatch(named.name):
        raise ConfigError(f"{flag} {named} is a checkpoint still being saved (or whose save was "
                          f"interrupted): give {named.parent} to use the newest complete one")
    elif (named / META_FILE).is_file():
        return named
    else:
        checkpoints = _checkpoints_dir(named)
        if checkpoints is None:
            raise ConfigError(_not_a_checkpoint(named, flag))
    chosen, why = _newest(checkpoints, flag, named)
    log.info("%s %s: using %s (%s)", flag, named, chosen, why)
    return chosen


def _not_a_checkpoint(path: Path, flag: str) -> str:
    if (path / "config.json").is_file():
        return (f"{flag} {path} is not a remax-megatron checkpoint: no {META_FILE} (it looks like "
                f"a Hugging Face directory: run remax-megatron convert hf-to-mcore --hf {path} "
                "--out DIR first)")
    if (path / METRICS_FILE).is_file():
        return (f"{flag} {path} is a training run directory without {CHECKPOINTS_DIR}/: wait for "
                "the run to save a checkpoint (checkpoint.save_every) or name a checkpoint "
                "directory")
    return (f"{flag} {path} is not a remax-megatron checkpoint (no {META_FILE}) nor a training "
            f"run directory (no {CHECKPOINTS_DIR}/): give one of those")
