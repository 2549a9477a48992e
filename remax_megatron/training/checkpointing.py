"""Training checkpoints: model, optimizer, LR scheduler, RNG, data position and step.

  OUTPUT/checkpoints/step_000010/   a full policy checkpoint (loads with load_model, exports
                                    with convert mcore-to-hf) plus optimizer/, rng/ and
                                    trainer_state.json
  OUTPUT/checkpoints/step_000010/critic/   PPO's value model and its optimizer (a reward-kind
                                    checkpoint of its own)
  OUTPUT/checkpoints/latest         the name of the last complete one

Every rank writes into a temporary directory; only when all are done does rank 0 rename it
into place and then point ``latest`` at it, so a crash while saving leaves the previous
checkpoint as the one that loads. A write that fails (full disk, read-only directory) on any
rank stops every rank with one line naming the file; the temporary directory is removed.

RNG states are safetensors (rng/rank_NNNNN.safetensors: tensors, and the Python/NumPy states as
integer tensors plus JSON), so loading them never unpickles anything.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config_io import ConfigError, atomic_write_text
from ..models.builder import unwrap
from ..models.checkpoint import (
    TOKENIZER_DIR, WEIGHTS_DIR, CheckpointMeta, load_weights, save_weights, sharded_state_dict,
    write_checkpoint_files,
)
from ..models.checksums import checksum_share, gathered, verify_checksums, write_checksums
from ..models.locate import complete_steps, newest_complete
from ..models.dcp_reader import describe_os_error, file_error, load_sharded
from ..runtime.distributed import agreed
from .checkpoint_checks import LATEST, OPTIMIZER_DIR, STATE_FILE, check_training_checkpoint
from .engine import prime_optimizer_state, restore_adam_steps
from .rng_state import RNG_DIR, restore_rng, rng_file, write_rng

log = logging.getLogger(__name__)

# Fully parallel save/load of the distributed optimizer's state, reshardable in data parallelism
# (megatron-core's default format of this release relies on an unsupported flattened layout).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class ExtraModel:
    """A second trained model saved with the policy (PPO's critic): its own checkpoint directory
    inside the step's, loadable with load_model and exportable like any checkpoint."""

    name: str  # the subdirectory
    model: object  # DDP-wrapped
    optimizer: object
    meta: CheckpointMeta
    model_config: object
    hf_config: dict | None


class _SaveFailed(Exception):
    """A checkpoint write failed; ``cause`` says where and why (None on a rank that only saw
    another rank's failure: rank 0, which prints, always has the cause)."""

    def __init__(self, cause: str | None):
        super().__init__(cause)
        self.cause = cause


def _agreed_write(fn) -> None:
    """Run ``fn`` (file writes, no collectives) on every rank; a write error on any rank stops
    all of them (all_gather: the others must not wait for it in the next collective)."""
    error = None
    try:
        fn()
    except OSError as err:
        error = describe_os_error(err)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise _SaveFailed(first)


def _peer_failure(err: BaseException) -> bool:
    """What a rank sees when another rank's save failed: megatron's CheckpointException without
    details (only the coordinator gets them), or the collective broken by a rank that left."""
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(err, CheckpointException):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("connection", "broken pipe", "peer", "gloo", "nccl"))


def _save_model_and_optimizer(directory: Path, model, optimizer) -> None:
    """Collective. megatron's save writes some files on rank 0 alone between its collectives: a
    failure there cannot be agreed on (the others wait inside megatron); rank 0 then reports and
    exits, which ends the others (torchrun stops the job; gloo sees the peer gone)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import CheckpointException

    # megatron's writer processes log a failed write themselves; our one line says it all
    writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = writer_log.level
    writer_log.setLevel(logging.CRITICAL)
    prime_optimizer_state(optimizer)  # a distributed optimizer that never stepped saves too
    try:
        save_weights(model, directory / WEIGHTS_DIR)
        dist_checkpointing.save(
            optimizer.sharded_state_dict(sharded_state_dict(model),
                                         metadata=OPTIMIZER_METADATA),
            str(directory / OPTIMIZER_DIR))
    except (Exception, CheckpointException) as err:
        cause = file_error(err)
        if cause is not None:
            raise _SaveFailed(describe_os_error(cause)) from None
        if dist.get_rank() != 0 and _peer_failure(err):
            raise _SaveFailed(None) from None
        err.add_note(f"(while saving {directory})")
        raise
    finally:
        writer_log.setLevel(level)


@torch.no_grad()  # the distributed optimizer copies into its fp32 main parameters on load
def _load_model_and_optimizer(directory: Path, model, optimizer) -> None:
    load_weights(model, directory / WEIGHTS_DIR)
    prime_optimizer_state(optimizer)  # megatron's load-time state dict needs Adam's 'step'
    opt_state = load_sharded(
        optimizer.sharded_state_dict(sharded_state_dict(model), is_loading=True,
                                     metadata=OPTIMIZER_METADATA),
        directory / OPTIMIZER_DIR)
    optimizer.load_state_dict(opt_state)
    restore_adam_steps(optimizer, opt_state)


def save_training_checkpoint(root: Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                             meta: CheckpointMeta, model_config, hf_config, tokenizer,
                             keep_last: int, extra_files=(), extra_models=()) -> Path:
    """Collective: every rank calls it. A failed write raises the same one-line ConfigError on
    every rank, after removing the partial directory; the checkpoints before it are untouched."""
    root = Path(root) / "checkpoints"
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    rank = dist.get_rank()

    def prepare():
        for stale in _stale_dirs(root):  # partial saves of runs that died (one run per output_dir)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        for sub in ("", *(extra.name for extra in extra_models)):
            for part in (WEIGHTS_DIR, OPTIMIZER_DIR):
                (tmp / sub / part).mkdir(parents=True, exist_ok=True)
        (tmp / RNG_DIR).mkdir()

    def small_files():
        write_rng(rng_file(tmp, rank))
        if rank != 0:
            return
        write_checkpoint_files(tmp, CheckpointMeta(**{**asdict(meta), "step": step}),
                               model_config, hf_config)
        for extra in extra_models:
            write_checkpoint_files(tmp / extra.name,
                                   CheckpointMeta(**{**asdict(extra.meta), "step": step}),
                                   extra.model_config, extra.hf_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            for extra in extra_models:
                tokenizer.save_pretrained(str(tmp / extra.name / TOKENIZER_DIR))
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        state = {**trainer_state, "scheduler": scheduler.state_dict(),
                 "world_size": dist.get_world_size()}
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1) + "\n")  # last: complete

    try:
        _agreed_write(lambda: prepare() if rank == 0 else None)
        _save_model_and_optimizer(tmp, model, optimizer)
        for extra in extra_models:
            _save_model_and_optimizer(tmp / extra.name, extra.model, extra.optimizer)
        _agreed_write(small_files)
        for directory in (tmp, *(tmp / extra.name for extra in extra_models)):
            _write_checksums(directory)
        _agreed_write(lambda: _publish(root, tmp, final) if rank == 0 else None)
    except _SaveFailed as err:
        removed = _remove_partial(tmp)
        raise ConfigError(_save_failed_message(root, name, tmp, err.cause, removed)) from None
    if rank == 0:
        _prune(root, keep_last, step)
        log.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def _write_checksums(directory: Path) -> None:
    """Collective: every rank hashes a share of the finished files, rank 0 writes the list."""
    share = {}
    _agreed_write(lambda: share.update(checksum_share(directory)))
    files = gathered(share)
    _agreed_write(lambda: write_checksums(directory, files) if dist.get_rank() == 0 else None)


def _remove_partial(tmp: Path) -> bool:
    """Every rank removes it, for a few tries: when rank 0 failed alone inside megatron's save,
    another rank may still be making directories in it before it blocks (the next save also
    clears what a killed rank left). Returns whether it is gone."""
    for attempt in range(10):
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            return True
        time.sleep(0.2)
    return False


_STALE_DIR = re.compile(r"\.step_\d+\.(tmp|old)")


def _stale_dirs(root: Path) -> list[Path]:
    """The .step_N.tmp / .step_N.old directories only this module makes."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir()
            if _STALE_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished directory into place and point ``latest`` at it; on failure put
    everything back as it was (the caller removes ``tmp``)."""
    aside = root / f".{final.name}.old"
    if final.exists():  # the same step saved again (a resumed run that had already ended)
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    try:
        tmp.rename(final)
        try:
            atomic_write_text(root / LATEST, final.name + "\n")
        except OSError:
            final.rename(tmp)
            raise
    except OSError:
        if aside.exists() and not final.exists():
            aside.rename(final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _save_failed_message(root: Path, name: str, tmp: Path, cause: str | None,
                         removed: bool) -> str:
    what = f"could not write {cause}" if cause else "another rank could not write its part"
    good = _last_good(root)
    kept = (f"the last good checkpoint {good} is intact" if good is not None
            else "there is no earlier checkpoint")
    cleaned = f"{tmp.name} was removed" if removed else f"delete {tmp} by hand"
    then = "then --resume continues from it" if good is not None else "then run again"
    return (f"checkpoint {name} not saved: {what}; {kept} and {cleaned}: free disk space or "
            f"make {root} writable, {then}")


def _last_good(root: Path) -> Path | None:
    """The checkpoint a resume would use: ``latest`` if complete, else the newest complete."""
    return newest_complete(root)[0]


def _prune(root: Path, keep_last: int, saved_step: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints up to the one just saved. Only
    step_<digits> directories are candidates (never a user's own); never the one just saved or
    the one ``latest`` names; never a higher step than this save (another run's, e.g. before a
    restart from an earlier checkpoint)."""
    if keep_last < 1:
        return
    try:
        pinned = {(root / LATEST).read_text().strip(), f"step_{saved_step:06d}"}
    except (OSError, UnicodeDecodeError):
        pinned = {f"step_{saved_step:06d}"}
    mine = [(step, path) for step, path in complete_steps(root) if step <= saved_step]
    for _, old in mine[:-keep_last]:
        if old.name not in pinned:
            shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(path: Path, model, optimizer, scheduler, extra_models=()) -> dict:
    """Restore model, optimizer, scheduler (unless None), extra models (by name) and (same world
    size) RNG; returns the trainer state."""
    path = Path(path)
    # the models were built from this run's config: each must be the one saved (a vocabulary
    # change would otherwise load: megatron lets embedding rows differ, for padding)
    built = {"": getattr(unwrap(model), "model_config", None)}
    built.update({extra.name: getattr(unwrap(extra.model), "model_config", None)
                  for extra in extra_models})
    state = agreed(lambda: check_training_checkpoint(
        path, built[""], {name: config for name, config in built.items() if name}))
    for directory in (path, *(path / extra.name for extra in extra_models)):
        if directory.is_dir():
            verify_checksums(directory)
    _load_model_and_optimizer(path, model, optimizer)
    for extra in extra_models:
        if not (path / extra.name / WEIGHTS_DIR).is_dir():
            raise ConfigError(f"{path} has no {extra.name}/: it was written by a run without a "
                              f"{extra.name}, so this run cannot resume from it")
        _load_model_and_optimizer(path / extra.name, extra.model, extra.optimizer)
    if scheduler is not None:  # None: the caller rebuilds the schedule from its config
        scheduler.load_state_dict(state["scheduler"])
    warning = agreed(lambda: restore_rng(path, state.get("world_size")))
    if warning and dist.get_rank() == 0:  # the same on every rank
        log.warning(warning)
    return state
