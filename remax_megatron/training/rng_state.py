"""Each rank's random-number-generator states in a training checkpoint, without pickle:
rng/rank_NNNNN.safetensors holds torch's, CUDA's and megatron's tracker states as tensors and
Python's and NumPy's Mersenne Twister words as int64 tensors (their few scalars as JSON
metadata). A pickled rank_NNNNN.pt of an older release is never read: unpickling runs code."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.distributed as dist

from ..config_io import ConfigError
from ..models.dcp_reader import one_line

RNG_DIR = "rng"

RNG_FORMAT = "remax-rng-1"


def rng_file(directory: Path, rank: int) -> Path:
    return directory / RNG_DIR / f"rank_{rank:05d}.safetensors"


def _legacyrng_file(directory: Path, rank: int) -> Path:
    """Where releases before safetensors put a pickled RNG dict: never loaded."""
    return directory / RNG_DIR / f"rank_{rank:05d}.pt"


def write_rng(path: Path) -> None:
    """This rank's RNG states as tensors (torch, CUDA, megatron's tracker, Python's and NumPy's
    Mersenne Twister words as int64) and JSON for the few scalars."""
    import numpy as np
    from megatron.core import tensor_parallel
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"RNG tracker state {name} is a {type(state).__name__}, not a tensor")
        tensors[f"tracker/{name}"] = state
    version, words, gauss = random.getstate()
    tensors["python"] = torch.tensor(words, dtype=torch.int64)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {"format": RNG_FORMAT, "python": json.dumps([version, gauss]),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata=meta)


def _read_rng(path: Path):
    """The states in ``path``, checked and converted, without applying them."""
    from safetensors import safe_open

    import numpy as np

    fix = ("delete it to resume with fresh RNG streams (the run then differs from an "
           "uninterrupted one), or resume from an earlier checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise ConfigError(f"{path} cannot be read ({one_line(err)}): {fix}") from None
    try:
        if meta.get("format") != RNG_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {RNG_FORMAT!r}")
        version, gauss = json.loads(meta["python"])
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        python = (int(version), tuple(int(w) for w in tensors["python"].tolist()), gauss)
        numpy = (str(kind), np.asarray(tensors["numpy"].numpy(), dtype=np.uint32), int(pos),
                 int(has_gauss), float(cached))
        tracker = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker/")}
        return python, numpy, tensors["torch"], tensors.get("cuda"), tracker
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"{path} holds no valid RNG state ({one_line(err)}): {fix}") from None


def _set_rng(path: Path) -> None:
    import numpy as np
    from megatron.core import tensor_parallel

    python, numpy, cpu, cuda, tracker = _read_rng(path)
    try:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
    except (ValueError, TypeError, RuntimeError) as err:  # wrong sizes
        raise ConfigError(f"{path} holds no valid RNG state ({one_line(err)}): delete it to resume "
                          "with fresh RNG streams, or resume from an earlier checkpoint") from None
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def restore_rng(path: Path, saved_world) -> str | None:
    """Restore this rank's RNG; returns why it could not (a warning), if so."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if saved_world != world:
        return (f"resuming on {world} ranks from a checkpoint of {saved_world}: RNG streams "
                "restart")
    new, old = rng_file(path, rank), _legacyrng_file(path, rank)
    if new.is_file():
        _set_rng(new)
        return None
    if old.is_file():
        # Decided: an old checkpoint still resumes (weights, optimizer, schedule, data position
        # are all there), but its pickled RNG file is never unpickled: unpickling runs code.
        return (f"{old} is the old pickled RNG format, which is not loaded (unpickling a file "
                "can run code): RNG streams restart, so the run differs from an uninterrupted one")
    return f"{path / RNG_DIR} has no RNG state for rank {rank}: RNG streams restart"
