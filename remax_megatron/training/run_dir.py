"""A training run's output directory: one run per directory, held under a lock while it runs,
and the choice between starting, resuming and starting over made once, by global rank 0,
before any model is built. Nothing the user did not ask to remove is removed, and only what a
run of ours wrote is ever removed: a run records the names it writes (MANIFEST, written before
any of them) and --overwrite / --resume auto remove those names only.

  start      the directory is new or empty, or holds only an earlier run's files (then
             --overwrite or --resume is needed); --allow-other-files: it may also hold other
             files, which are never touched (a file named like one a run writes is refused)
  --resume   continue from the newest complete checkpoint (an error when there is none)
  --resume auto   resume when there is a checkpoint, else start over (a requeued cluster job:
                  a previous attempt that saved no checkpoint is replaced); a checkpoints/
                  holding saves none of which is complete stops it instead (never starts over)
  --overwrite     remove the previous run's files (the manifest's names only), then start
Never: the file system's root or the home directory.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config_io import ConfigError

log = logging.getLogger(__name__)

# What a run writes at the top of its directory; their presence means "another run is here".
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "eval.jsonl", "checkpoints",
             "tensorboard", "reward_curves.png", "loss_curves.png", "hf", "wandb")
LOCK_FILE = ".remax-run.lock"
MANIFEST = ".remax-run.json"  # {"written_by": "remax-megatron", "files": [names a run writes]}
OURS = (LOCK_FILE, MANIFEST)
RESUME_MODES = ("no", "yes", "auto")
_held_locks: list = []  # the lock files this process holds


def _drop_locks_in_child() -> None:
    # A forked child (megatron's checkpoint writers) shares the lock's open file: it must not
    # keep the lock alive after this process dies; closing its copy leaves ours held.
    for handle in _held_locks:
        handle.close()
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


@dataclass
class RunPlan:
    resume_from: Path | None  # the checkpoint to continue from; None: a new run


def resume_mode(value) -> str:
    """--resume as given (True/False from the Python API, or 'auto')."""
    if value is True:
        return "yes"
    if value in (False, None):
        return "no"
    if value not in RESUME_MODES:
        raise ConfigError(f"--resume {value!r}: use --resume (continue, a checkpoint must exist) "
                          "or --resume auto (continue if there is a checkpoint, else start)")
    return value


class RunDirectory:
    """Rank 0 prepares the directory and holds its lock until ``close``."""

    def __init__(self, path, resume="no", overwrite: bool = False,
                 allow_other_files: bool = False):
        self.path = Path(path)
        self.resume = resume_mode(resume)
        self.overwrite = overwrite
        self.allow_other_files = allow_other_files
        self._lock = None
        if overwrite and self.resume != "no":
            raise ConfigError("--overwrite starts over and --resume continues: give one of them")

    def prepare(self, find_checkpoint) -> RunPlan:
        """Create and lock the directory, then decide. ``find_checkpoint(path)`` returns the
        newest complete checkpoint or None."""
        self._create()
        self._acquire_lock()
        try:
            return self._decide(find_checkpoint)
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        real = self.path.expanduser().resolve()
        for special, what in ((Path(real.anchor), "the root directory"),
                              (Path.home().resolve(), "the home directory")):
            if real == special:
                raise ConfigError(f"output_dir {self.path} is {what}: a run writes (and "
                                  "--overwrite removes) files there; give it a directory of its "
                                  "own, e.g. runs/NAME")
        if self.resume == "yes" and not self.path.exists():
            raise ConfigError(f"--resume: output_dir {self.path} does not exist: check the path, "
                              "or drop --resume to start a new run there")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output_dir {self.path} is a file: choose a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # a probe file: a read-only or full file system stops the run here, not at the
            # first checkpoint an hour later
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ConfigError(f"output_dir {self.path} cannot be written "
                              f"({err.strerror or err}): choose another output_dir") from None

    def _acquire_lock(self) -> None:
        import fcntl

        path = self.path / LOCK_FILE
        handle = open(path, "a+")
        try:
            # flock is released by the kernel when the process dies, even by kill -9: never stale
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read().strip()
            if err.errno not in (errno.EAGAIN, errno.EACCES):  # e.g. a mount without locks
                log.warning("cannot lock %s (%s): running without a lock, so nothing stops a "
                            "second run from writing into %s", path, err.strerror, self.path)
                self._lock = handle
                return
            handle.close()
            raise ConfigError(f"output_dir {self.path} is in use by another run ({_describe(holder)}): "
                              "wait for it to finish, or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "command": " ".join(sys.argv)}) + "\n")
        handle.flush()
        self._lock = handle
        _held_locks.append(handle)

    def _decide(self, find_checkpoint) -> RunPlan:
        entries = {p.name for p in self.path.iterdir()} - set(OURS)
        owned = read_manifest(self.path)
        previous = sorted(entries & (owned or set()))
        checkpoint = find_checkpoint(self.path) if self.resume != "no" else None
        if checkpoint is not None and owned is None:
            # a run of an earlier version (no manifest) with a complete checkpoint of ours
            owned, previous = set(RUN_FILES), sorted(entries & set(RUN_FILES))
            log.info("output_dir %s: a run without %s; its %s are taken as the run's own",
                     self.path, MANIFEST, ", ".join(previous))
        if self.resume == "yes" and checkpoint is None:
            what = ("holds a run that saved no checkpoint" if previous else "holds no run")
            raise ConfigError(f"--resume: output_dir {self.path} {what}, so there is nothing to "
                              "resume: drop --resume to start a new run"
                              + (" (with --overwrite to replace it)" if previous else "")
                              + ", or use --resume auto")
        if checkpoint is not None:
            self._check_collisions(entries, owned)
            write_manifest(self.path, owned | set(RUN_FILES))
            return RunPlan(checkpoint)
        if self.resume == "auto" and "checkpoints" in previous:
            saves = unfinished_saves(self.path / "checkpoints")
            if saves:
                raise ConfigError(
                    f"--resume auto: {self.path / 'checkpoints'} holds {', '.join(saves[:3])} "
                    "but no complete checkpoint (a save without trainer_state.json or weights), "
                    "so it will not start over and remove them: fix or move them, or start over "
                    "with --overwrite")
        if previous and not (self.overwrite or self.resume == "auto"):
            found = ", ".join(name + ("/" if (self.path / name).is_dir() else "")
                              for name in previous)
            raise ConfigError(f"output_dir {self.path} holds another run ({found}): --resume to "
                              "continue it, --overwrite to start over (removes those), or choose "
                              "another output_dir")
        self._check_collisions(entries, owned)
        others = sorted(entries - (owned or set()))
        if others and not self.allow_other_files:
            more = f" and {len(others) - 4} more" if len(others) > 4 else ""
            shown = ", ".join(others[:4]) + more
            raise ConfigError(f"output_dir {self.path} holds files no remax-megatron run wrote "
                              f"({shown}): choose a new or empty output_dir, or pass "
                              "--allow-other-files to start beside them (never touched)")
        if previous:
            for name in previous:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            log.info("output_dir %s: removed the previous run's %s (%s)", self.path,
                     ", ".join(previous), "--overwrite" if self.overwrite
                     else "--resume auto found no checkpoint")
        write_manifest(self.path, set(RUN_FILES))
        return RunPlan(None)

    def _check_collisions(self, entries: set, owned) -> None:
        """Files named like those a run writes that no run of ours wrote: always refused (the
        run would write over them, or a later --overwrite remove them)."""
        clash = sorted((entries & set(RUN_FILES)) - (owned or set()))
        if clash:
            names = ", ".join(n + ("/" if (self.path / n).is_dir() else "") for n in clash)
            why = (f"its {MANIFEST} does not list them" if owned is not None
                   else f"it has no {MANIFEST}: another tool's files, or a hand-made copy")
            raise ConfigError(f"output_dir {self.path} holds {names}, which a run writes, but no "
                              f"remax-megatron run wrote them there ({why}): move them, or "
                              "choose another output_dir")

    def close(self) -> None:
        if self._lock is None:
            return
        import fcntl

        try:
            # the file stays: unlinking it would let a waiting opener lock the old inode while
            # a newer run locks a new file of the same name
            fcntl.flock(self._lock, fcntl.LOCK_UN)
        finally:
            if self._lock in _held_locks:
                _held_locks.remove(self._lock)
            self._lock.close()
            self._lock = None


def read_manifest(path: Path) -> set | None:
    """The names a run of ours recorded writing in ``path``; None without a manifest (one that
    cannot be read counts as none: nothing is removed on its word)."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
        return {name for name in data["files"] if isinstance(name, str) and "/" not in name}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(path: Path, names: set) -> None:
    from ..config_io import atomic_write_text

    atomic_write_text(Path(path) / MANIFEST, json.dumps(
        {"written_by": "remax-megatron", "files": sorted(names)}) + "\n")


def unfinished_saves(checkpoints: Path) -> list[str]:
    """step_N directories (and a latest pointer) of ours in a checkpoints/ without a complete
    checkpoint: a damaged save a restart must not take for "nothing saved"."""
    from ..models.locate import LATEST, is_step_dir

    try:
        return sorted(p.name for p in checkpoints.iterdir()
                      if p.name == LATEST or is_step_dir(p))
    except OSError:
        return []


def newest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    from ..models.locate import resolve_checkpoint

    if not (Path(run) / "checkpoints").is_dir():
        return None
    try:
        return resolve_checkpoint(run, "--resume")
    except ConfigError:
        return None  # a run that saved no complete checkpoint


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "its lock file gives no details"
