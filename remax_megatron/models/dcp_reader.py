"""Reading megatron-core dist_checkpointing directories defensively: every file checked before
torch opens it, nothing unpickled that torch's own loaders would not accept with weights_only,
and every damaged-file failure turned into one line that names the file.

The format is built on pickle: torch reads `.metadata` with plain pickle.load, megatron reads
common.pt with torch.load, and torch unpickles object entries inside the shards (the distributed
optimizer's param groups) with weights_only=False. Each is read here first through an allowlist
(torch's checkpoint-metadata classes for `.metadata`, weights_only=True for the rest).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from ..config_io import ConfigError
from ..runtime.distributed import agreed

# what every "this file is damaged" error ends with
DAMAGED = "the checkpoint is damaged (an interrupted copy?): copy it again or use another one"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} cannot be read as JSON ({one_line(err)}): {DAMAGED}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object: {DAMAGED}")
    return data


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception as a short single line (torch's messages run to many lines)."""
    text = str(err)
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsupported:  # torch's weights_only refusal: a paragraph, then the name that matters
        return f"it asks for {unsupported.group(1)}"
    text = text.split(" This is an internal miniz error")[0]  # torch's zip reader
    text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    text = text or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- reading dist_checkpointing directories ------------------------------------------------
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards: a pickle
MCORE_METADATA = "metadata.json"  # megatron's backend and version
COMMON_FILE = "common.pt"  # megatron's entries that are not sharded (torch.save)


class _Refused(pickle.UnpicklingError):
    """A global that torch never writes into a `.metadata` file."""


class _MetadataUnpickler(pickle.Unpickler):
    """torch reads `.metadata` with plain pickle.load, which runs whatever a planted file asks
    for. We read it first admitting only what torch writes there (its metadata dataclasses and
    enums, torch.Size, dtypes, layouts), so such a file is refused before torch opens it."""

    def find_class(self, module, name):
        if _metadata_global(module, name):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _metadata_global(module: str, name: str) -> bool:
    if not name.isidentifier():  # protocol 4 allows "a.b": attribute chains
        return False
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    if (module, name) == ("torch.serialization", "_get_layout"):  # layout name -> torch.layout
        return True
    if module.startswith("torch.distributed.checkpoint."):
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            return False
        # plain records: built without running code of their own
        return isinstance(obj, type) and (dataclasses.is_dataclass(obj)
                                          or issubclass(obj, enum.Enum))
    return False


def check_weights(directory) -> object:
    """Check a dist_checkpointing directory without loading tensors: megatron's metadata.json,
    torch's `.metadata` (read with the allowlist above), every shard file it names present and
    long enough, and common.pt readable with ``weights_only``. Returns torch's Metadata; every
    problem is a one-line ConfigError naming the file."""
    import megatron.core  # noqa: F401  (registers megatron's classes as weights_only-safe)
    from torch.distributed.checkpoint.metadata import Metadata

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is missing: {DAMAGED}")
    if not (directory / MCORE_METADATA).is_file():
        raise ConfigError(f"{directory}/{MCORE_METADATA} is missing: the weights are incomplete "
                          "(an interrupted save?) or not dist_checkpointing weights")
    config = read_json(directory / MCORE_METADATA)
    backends = (config.get("sharded_backend"), config.get("common_backend"))
    if backends != ("torch_dist", "torch"):
        raise ConfigError(f"{directory}/{MCORE_METADATA} names the backends {backends[0]!r} / "
                          f"{backends[1]!r}; remax-megatron reads 'torch_dist' / 'torch' only: "
                          f"{DAMAGED}")
    index = directory / DCP_METADATA
    if not index.is_file():
        raise ConfigError(f"{index} is missing: {DAMAGED}")
    try:
        with open(index, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except _Refused as err:
        raise ConfigError(f"{index} asks for {err}, which torch never writes there: not loaded "
                          "(the file was tampered with or is damaged); use checkpoints from a "
                          "trusted source") from None
    except Exception as err:  # garbage can fail a pickle parse in many ways
        raise ConfigError(f"{index} cannot be read ({type(err).__name__}: {one_line(err)}): "
                          f"{DAMAGED}") from None
    if not isinstance(metadata, Metadata):
        raise ConfigError(f"{index} holds a {type(metadata).__name__}, not torch checkpoint "
                          f"metadata: {DAMAGED}")
    _check_shard_files(directory, metadata)
    common = directory / COMMON_FILE
    if not common.is_file():
        raise ConfigError(f"{common} is missing: {DAMAGED}")
    _load_common(common)
    return metadata


def _check_shard_files(directory: Path, metadata) -> None:
    needed: dict[str, int] = {}
    try:
        for info in metadata.storage_data.values():
            name, end = str(info.relative_path), int(info.offset) + int(info.length)
            needed[name] = max(needed.get(name, 0), end)
    except (AttributeError, TypeError, ValueError) as err:
        raise ConfigError(f"{directory / DCP_METADATA} is malformed ({one_line(err)}): "
                          f"{DAMAGED}") from None
    for name, end in sorted(needed.items()):
        if Path(name).name != name:  # shards sit next to .metadata, nowhere else
            raise ConfigError(f"{directory / DCP_METADATA} points outside its directory "
                              f"({name!r}): {DAMAGED}")
        shard = directory / name
        if not shard.is_file():
            raise ConfigError(f"{shard} is missing: {DAMAGED}")
        size = shard.stat().st_size
        if size < end:
            raise ConfigError(f"{shard} is truncated ({size} bytes, {end} expected): {DAMAGED}")


def _load_common(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{path} is not loadable with weights_only=True ({one_line(err)}): "
                          "not loaded (the file was tampered with or is damaged); use "
                          "checkpoints from a trusted source") from None
    except Exception as err:  # a truncated zip, a bad header: torch raises several types
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {one_line(err)}): "
                          f"{DAMAGED}") from None


def _weights_only_common_strategy():
    """megatron's common.pt reader with weights_only stated, not left to torch's default (which
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns off)."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class WeightsOnlyCommonLoad(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return _load_common(Path(checkpoint_dir) / COMMON_FILE)

    return WeightsOnlyCommonLoad()


def _check_request(state: dict, metadata, directory: Path) -> None:
    """What this rank asks for exists in the checkpoint with the same global shape: one line
    naming the key and both shapes (megatron's own errors list every key of the checkpoint)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = metadata.state_dict_metadata
    requested = [t for t in nested_values(state) if isinstance(t, ShardedTensor)]
    objects = [o for o in nested_values(state) if isinstance(o, ShardedObject)]
    missing = ([t.key for t in requested if t.key not in stored]
               + [o.unique_key for o in objects if o.unique_key not in stored])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{directory} lacks {missing[0]}{more}: it was saved from a different "
                          "model or optimizer setup than this run builds; load it with the "
                          "settings it was saved with")
    for t in requested:
        entry = stored[t.key]
        if not isinstance(entry, TensorStorageMetadata):
            # torch would unpickle such an entry (weights_only=False): refuse before it does
            raise ConfigError(f"{directory}/{DCP_METADATA} stores {t.key} as a pickled object, "
                              "not a tensor: not loaded (the file was tampered with or is "
                              "damaged); use checkpoints from a trusted source")
        if not t.allow_shape_mismatch and tuple(entry.size) != tuple(t.global_shape):
            raise ConfigError(f"{directory}: {t.key} is {list(entry.size)} in the checkpoint but "
                              f"{list(t.global_shape)} in this model: the checkpoint was saved "
                              "from a different model (hidden size, layers, vocabulary); load it "
                              "with the model settings it was saved with")
    for o in objects:
        _check_object_bytes(directory, metadata, o.unique_key)


def _check_object_bytes(directory: Path, metadata, key: str) -> None:
    """torch unpickles a requested object entry (megatron's ShardedObject: the distributed
    optimizer's param groups and bucket sizes) with weights_only=False. Read its bytes first
    with weights_only=True: what passes holds only torch's safe types, and loads the same way."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    if not isinstance(metadata.state_dict_metadata[key], BytesStorageMetadata):
        raise ConfigError(f"{directory}/{DCP_METADATA} stores {key} as a tensor, not an object: "
                          f"{DAMAGED}")
    infos = [info for index, info in metadata.storage_data.items() if index.fqn == key]
    if len(infos) != 1 or getattr(infos[0], "transform_descriptors", None):
        raise ConfigError(f"{directory}/{DCP_METADATA} stores {key} in a layout remax-megatron "
                          f"does not check (not one untransformed entry): {DAMAGED}")
    info = infos[0]
    shard = directory / info.relative_path
    with open(shard, "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{shard} holds {key} with content outside torch's weights_only "
                          f"allowlist ({one_line(err)}): not loaded (the file was tampered with "
                          "or is damaged); use checkpoints from a trusted source") from None
    except Exception as err:
        raise ConfigError(f"{shard} holds an unreadable {key} ({type(err).__name__}: "
                          f"{one_line(err)}): {DAMAGED}") from None


def load_sharded(state: dict, directory) -> dict:
    """``dist_checkpointing.load`` (collective) after the checks above, agreed across ranks.
    File problems that surface only while reading become one-line ConfigErrors; anything else
    is re-raised with the directory noted."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    agreed(lambda: _check_request(state, check_weights(directory), directory))
    try:
        return dist_checkpointing.load(state, str(directory),
                                       common_strategy=_weights_only_common_strategy())
    except ConfigError:
        raise
    except (Exception, _checkpoint_exception()) as err:
        cause = read_fault(err)
        if cause is None:
            err.add_note(f"(while loading {directory})")
            raise
        raise ConfigError(f"{directory} cannot be read ({cause}): {DAMAGED}") from None


def _checkpoint_exception() -> type:
    # torch's CheckpointException derives from BaseException: name it to catch it
    from torch.distributed.checkpoint import CheckpointException

    return CheckpointException


def read_fault(err: BaseException) -> Optional[str]:
    """A file-level cause in ``err`` (torch's CheckpointException carries the rank's original
    exceptions), as one line; None when it is not one (a bug: re-raise)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    for exc in _causes(err):
        if isinstance(exc, OSError):
            return describe_os_error(exc)
        if isinstance(exc, (EOFError, pickle.UnpicklingError, CheckpointingException)):
            return f"{type(exc).__name__}: {one_line(exc)}"
        if isinstance(exc, RuntimeError) and any(
                mark in str(exc) for mark in ("PytorchStreamReader", "zip archive", "EOF")):
            return one_line(exc)  # torch.load of a damaged shard
    return None


def file_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind ``err``: itself, a cause, one torch gathered from a rank, or (megatron's
    writer processes send only its text) one named in a message as "[Errno N] text: 'path'"."""
    causes = list(_causes(err))
    found = next((exc for exc in causes if isinstance(exc, OSError)), None)
    if found is not None:
        return found
    for exc in causes:
        match = _ERRNO_TEXT.search(str(exc))
        if match:
            return OSError(int(match.group(1)), match.group(2), match.group(3))
    return None


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+): '([^'\n]+)'")


def describe_os_error(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or one_line(err)}"


def _causes(err: BaseException):
    """``err``, the exceptions torch gathered from each rank, and their causes."""
    seen, todo = set(), [err]
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        failures = getattr(exc, "failures", None)
        for wrapped in (failures.values() if isinstance(failures, dict) else ()):
            todo.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        todo += [exc.__cause__, exc.__context__]
