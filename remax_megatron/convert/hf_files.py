"""Hugging Face checkpoint directories: find the weight files, read shapes without loading, read one
tensor at a time, and write sharded safetensors.

Reading a safetensors file here is a plain ``readinto`` of one tensor's byte range into memory we
own: no memory map, so the process holds exactly the tensors it is converting (a mapped file's
touched pages would otherwise count against our resident memory).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config_io import ConfigError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0  # byte offset in a safetensors file
    end: int = 0


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    corrupt = ConfigError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                          "download it again")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:  # a damaged length: never try to read (or allocate) it
                raise corrupt
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        raise corrupt from None
    data_start = 8 + length
    out = {}
    try:
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = (data_start + int(o) for o in meta["data_offsets"])
            if end > size:
                raise ConfigError(f"{path} is truncated ({size} bytes, {name} ends at {end}): "
                                  "download it again")
            out[name] = TensorInfo(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), begin, end)
    except ConfigError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError):  # a header of the wrong shape
        raise corrupt from None
    return out


def read_safetensors_tensor(info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.end - info.begin, dtype=torch.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        if f.readinto(memoryview(buf.numpy())) != buf.numel():
            raise ConfigError(f"{info.file} is truncated: download it again")
    return buf.view(info.dtype).reshape(info.shape)


@dataclass
class HFWeights:
    """Lazy access to every tensor of an HF checkpoint directory, by name."""

    directory: Path
    tensors: dict[str, TensorInfo]
    _bin_cache: dict = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.file.suffix == ".safetensors":
            return read_safetensors_tensor(info)
        if info.file not in self._bin_cache:
            self._bin_cache.clear()  # keep one .bin shard mapped at a time
            self._bin_cache[info.file] = torch.load(info.file, map_location="cpu",
                                                    weights_only=True, mmap=True)
        return self._bin_cache[info.file][name]

    def floating_dtype(self) -> torch.dtype:
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                return info.dtype
        raise ConfigError(f"{self.directory} holds no floating-point weights")


def _index_files(directory: Path, index_name: str) -> dict[str, Path]:
    path = directory / index_name
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a valid index (no weight_map): download it again") from None
    files = {name: directory / fname for name, fname in weight_map.items()}
    missing = sorted({p.name for p in files.values() if not p.is_file()})
    if missing:
        raise ConfigError(f"{directory} is incomplete: {index_name} lists {len(missing)} weight "
                          f"file(s) that are missing, first {missing[0]}: download them")
    return files


def open_hf_weights(directory: Path) -> HFWeights:
    """Index every tensor of a save_pretrained directory (safetensors, sharded or not; or .bin)."""
    directory = Path(directory)
    if (directory / SAFE_INDEX).is_file():
        files = sorted(set(_index_files(directory, SAFE_INDEX).values()))
    elif (directory / SAFE_SINGLE).is_file():
        files = [directory / SAFE_SINGLE]
    elif (directory / BIN_INDEX).is_file() or (directory / BIN_SINGLE).is_file():
        return _open_bin(directory)
    else:
        raise ConfigError(f"{directory} has no weights (model.safetensors, its index, or "
                          "pytorch_model.bin): point --hf at a save_pretrained directory")
    tensors = {}
    for path in files:
        tensors.update(read_safetensors_header(path))
    if (directory / SAFE_INDEX).is_file():
        listed = _index_files(directory, SAFE_INDEX)
        absent = sorted(set(listed) - set(tensors))
        if absent:
            raise ConfigError(f"{directory}: {absent[0]} is in the index but in no weight file: "
                              "the download is partial")
    return HFWeights(directory, tensors)


def _open_bin(directory: Path) -> HFWeights:
    if (directory / BIN_INDEX).is_file():
        files = sorted(set(_index_files(directory, BIN_INDEX).values()))
    else:
        files = [directory / BIN_SINGLE]
    tensors = {}
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises several types for a bad pickle / zip
            raise ConfigError(f"{path} cannot be read ({type(err).__name__}): download it "
                              "again") from None
        for name, t in state.items():
            tensors[name] = TensorInfo(path, t.dtype, tuple(t.shape))
        del state
    return HFWeights(directory, tensors)


def copy_files(src: Path, dst: Path, names=TOKENIZER_FILES) -> list[str]:
    """Copy those of ``names`` present in ``src`` (default: the tokenizer files) into ``dst``."""
    copied = []
    for name in names:
        if (Path(src) / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    return copied


def has_tokenizer(files: list[str]) -> bool:
    return any(f in files for f in ("tokenizer.json", "vocab.json", "tokenizer.model"))


class ShardedSafetensorsWriter:
    """Stream tensors into model-0000i-of-0000N.safetensors shards of at most ``max_shard_bytes``.

    Shapes and dtypes are planned up front, so each shard's header is written first and every
    tensor goes to disk as it arrives: memory holds one tensor, not one shard. Tensors must
    arrive in the planned order. An HF index is written when there is more than one shard.
    """

    def __init__(self, directory: Path, planned: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 2 * 2**30):
        self.directory = Path(directory)
        self.planned = planned
        self.order = list(planned)
        self.shards: list[list[str]] = []
        size = 0
        for name, (shape, dtype) in planned.items():
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if not self.shards or (size + nbytes > max_shard_bytes and size > 0):
                self.shards.append([])
                size = 0
            self.shards[-1].append(name)
            size += nbytes
        self.shard_of = {n: i for i, names in enumerate(self.shards) for n in names}
        self.next = 0
        self.file = None
        self.open_shard = -1

    @property
    def num_shards(self) -> int:
        return max(1, len(self.shards))

    def file_name(self, shard: int) -> str:
        if self.num_shards == 1:
            return SAFE_SINGLE
        return f"model-{shard + 1:05d}-of-{self.num_shards:05d}.safetensors"

    def _start_shard(self, shard: int) -> None:
        if self.file is not None:
            self.file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in self.shards[shard]:
            shape, dtype = self.planned[name]
            end = offset + torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        self.file = open(self.directory / self.file_name(shard), "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.open_shard = shard

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or name != self.order[self.next]:
            expected = self.order[self.next] if self.next < len(self.order) else "nothing"
            raise ValueError(f"safetensors writer: got {name}, expected {expected}")
        shape, dtype = self.planned[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {tuple(shape)} {dtype}")
        if self.shard_of[name] != self.open_shard:
            self._start_shard(self.shard_of[name])
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.next += 1

    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.next != len(self.order):
            raise ValueError(f"tensors never written, first {self.order[self.next]}")
        if self.num_shards > 1:
            total = sum(torch.Size(s).numel() * d.itemsize for s, d in self.planned.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: self.file_name(s) for n, s in self.shard_of.items()}}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2))


def directory_is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def tmp_sibling(path: Path) -> Path:
    """A fresh temporary directory next to ``path`` (same filesystem, so the final rename is atomic)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as err:  # a read-only or missing parent, no space, a file where a folder goes
        raise ConfigError(f"cannot make the temporary directory {tmp} next to --out "
                          f"({err.strerror or err}): choose an --out in a writable "
                          "directory") from None
    return tmp


def replace_directory(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` into place; an existing ``final`` (``--force``) goes only after."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
