"""A training run's output directory: one run per directory, held under a lock while it runs,
and the choice between starting, resuming and starting over made once, by global rank 0,
before any model is built. Nothing the user did not ask to remove is removed.

  start      the directory is new, empty, or holds only files that are not a run's
  --resume   continue from the newest complete checkpoint (an error when there is none)
  --resume auto   resume when there is a checkpoint, else start over (a requeued cluster job:
                  a previous attempt that saved no checkpoint is replaced)
  --overwrite     remove the previous run's files (RUN_FILES only), then start
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
             "tensorboard", "reward_curves.png", "hf", "wandb")
LOCK_FILE = ".remax-run.lock"
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

    def __init__(self, path, resume="no", overwrite: bool = False):
        self.path = Path(path)
        self.resume = resume_mode(resume)
        self.overwrite = overwrite
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
        previous = [name for name in RUN_FILES if (self.path / name).exists()]
        checkpoint = find_checkpoint(self.path) if previous and self.resume != "no" else None
        if self.resume == "yes" and checkpoint is None:
            what = ("holds a run that saved no checkpoint" if previous else "holds no run")
            raise ConfigError(f"--resume: output_dir {self.path} {what}, so there is nothing to "
                              "resume: drop --resume to start a new run"
                              + (" (with --overwrite to replace it)" if previous else "")
                              + ", or use --resume auto")
        if self.resume != "no" and checkpoint is not None:
            return RunPlan(checkpoint)
        if previous and not (self.overwrite or self.resume == "auto"):
            found = ", ".join(name + ("/" if (self.path / name).is_dir() else "")
                              for name in previous)
            raise ConfigError(f"output_dir {self.path} holds another run ({found}): --resume to "
                              "continue it, --overwrite to start over (removes those), or choose "
                              "another output_dir")
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
        return RunPlan(None)

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
