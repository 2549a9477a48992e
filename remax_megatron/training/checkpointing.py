"""Training checkpoints: model, optimizer, LR scheduler, RNG, data position and step.

  OUTPUT/checkpoints/step_000010/   a full policy checkpoint (loads with load_model, exports
                                    with convert mcore-to-hf) plus optimizer/, rng/ and
                                    trainer_state.json
  OUTPUT/checkpoints/step_000010/critic/   PPO's value model and its optimizer (a reward-kind
                                    checkpoint of its own)
  OUTPUT/checkpoints/latest         the name of the last complete one

Every rank writes into a temporary directory; only when all are done does rank 0 rename it
into place and then point ``latest`` at it, so a crash while saving leaves the previous
checkpoint as the one that loads.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
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

log = logging.getLogger(__name__)

OPTIMIZER_DIR = "optimizer"
RNG_DIR = "rng"
STATE_FILE = "trainer_state.json"
LATEST = "latest"
# Fully parallel save/load of the distributed optimizer's state, reshardable in data parallelism
# (megatron-core's default format of this release relies on an unsupported flattened layout).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


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


def _save_model_and_optimizer(directory: Path, model, optimizer) -> None:
    from megatron.core import dist_checkpointing

    save_weights(model, directory / WEIGHTS_DIR)
    if dist.get_rank() == 0:
        (directory / OPTIMIZER_DIR).mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the directory exists for every rank before any of them writes
    dist_checkpointing.save(
        optimizer.sharded_state_dict(sharded_state_dict(unwrap(model)),
                                     metadata=OPTIMIZER_METADATA),
        str(directory / OPTIMIZER_DIR))


def _load_model_and_optimizer(directory: Path, model, optimizer) -> None:
    from megatron.core import dist_checkpointing

    load_weights(model, directory / WEIGHTS_DIR)
    opt_state = dist_checkpointing.load(
        optimizer.sharded_state_dict(sharded_state_dict(unwrap(model)), is_loading=True,
                                     metadata=OPTIMIZER_METADATA),
        str(directory / OPTIMIZER_DIR))
    optimizer.load_state_dict(opt_state)


def save_training_checkpoint(root: Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                             meta: CheckpointMeta, model_config, hf_config, tokenizer,
                             keep_last: int, extra_files=(), extra_models=()) -> Path:
    """Collective: every rank calls it."""
    root = Path(root) / "checkpoints"
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _save_model_and_optimizer(tmp, model, optimizer)
    for extra in extra_models:
        _save_model_and_optimizer(tmp / extra.name, extra.model, extra.optimizer)
    (tmp / RNG_DIR).mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / RNG_DIR / f"rank_{rank:05d}.pt")
    if rank == 0:
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
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1) + "\n")
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(root / LATEST, name + "\n")
        _prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    if keep_last < 1:
        return
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = Path(output_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"{pointer} names {path.name}, which is incomplete: delete {pointer} "
                          "to start over or point it at a complete step_* directory")
    return path


def load_training_checkpoint(path: Path, model, optimizer, scheduler, extra_models=()) -> dict:
    """Restore model, optimizer, scheduler, extra models (by name) and (same world size) RNG;
    returns the trainer state."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    _load_model_and_optimizer(path, model, optimizer)
    for extra in extra_models:
        if not (path / extra.name / WEIGHTS_DIR).is_dir():
            raise ConfigError(f"{path} has no {extra.name}/: it was written by a run without a "
                              f"{extra.name}, so this run cannot resume from it")
        _load_model_and_optimizer(path / extra.name, extra.model, extra.optimizer)
    scheduler.load_state_dict(state["scheduler"])
    rng = path / RNG_DIR / f"rank_{dist.get_rank():05d}.pt"
    if state.get("world_size") == dist.get_world_size() and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("resuming on %d ranks from a checkpoint of %s: RNG streams restart",
                    dist.get_world_size(), state.get("world_size"))
    return state
