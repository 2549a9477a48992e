"""Checksums of the files a checkpoint holds, written when it is saved and verified when it is
loaded: a byte changed inside a tensor (a bad disk, an interrupted or corrupted copy) is one line
naming the file, not silently wrong weights.

  CHECKPOINT/checksums.json   {"algorithm": "crc32", "files": {"model/__0_0.distcp": [size, crc]}}

A checkpoint nested in another (PPO's critic/) has its own and is left out of its parent's. CRC-32
(zlib: C speed, the GIL released while it runs, so a few threads hash several files at once)
catches every change of up to 32 consecutive bits and all but 1 in 4 billion others; it guards
against accidents, not against someone forging a file. Under torch.distributed the files are
shared out over the ranks. A checkpoint without checksums.json (written before they existed)
loads unchecked; REMAX_SKIP_CHECKSUMS=1 skips the check for a checkpoint you trust.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config_io import ConfigError, atomic_write_text

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
ALGORITHM = "crc32"
SKIP_VARIABLE = "REMAX_SKIP_CHECKSUMS"
CHUNK = 8 * 2**20
THREADS = 4


def listed_files(root: Path) -> list[str]:
    """Every file under ``root`` (relative, sorted), except checksums.json and nested
    checkpoints (directories with their own checksums.json or remax_checkpoint.json)."""
    from .checkpoint import META_FILE

    root = Path(root)
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        here = Path(directory)
        subdirs[:] = sorted(d for d in subdirs if not (here / d / META_FILE).is_file())
        found += [(here / f).relative_to(root).as_posix() for f in files
                  if not (here == root and f == CHECKSUMS)]
    return sorted(found)


def crc_of(path: Path) -> tuple[int, str]:
    """(size, CRC-32 as 8 hex digits) of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def digest(root: Path, names: list[str]) -> dict:
    """{name: [size, crc]} of ``names`` under ``root``, a few files at a time."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        sums = pool.map(lambda name: crc_of(Path(root) / name), names)
        return {name: list(s) for name, s in zip(names, sums)}


def _share() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def checksum_share(root: Path) -> dict:
    """This rank's share of ``root``'s files, hashed (no collectives: a caller that must agree
    on a failed read across ranks wraps it)."""
    rank, world = _share()
    return digest(root, listed_files(root)[rank::world])


def write_checksums(root: Path, files: dict) -> None:
    """checksums.json from every rank's share, merged (one process writes it)."""
    atomic_write_text(Path(root) / CHECKSUMS, json.dumps(
        {"algorithm": ALGORITHM, "files": files}, indent=0, sort_keys=True) + "\n")


def gathered(part: dict) -> dict:
    """Every rank's dict, merged (collective when torch.distributed runs)."""
    import torch.distributed as dist

    rank, world = _share()
    if world == 1:
        return part
    parts = [None] * world
    dist.all_gather_object(parts, part)
    return {key: value for p in parts for key, value in p.items()}


def verify_checksums(root: Path, skip: tuple = ()) -> int:
    """Check the files checksums.json lists (but those under the top-level directories in
    ``skip``) against their bytes; one ConfigError naming the first that differs, on every rank.
    Collective under torch.distributed. Returns the bytes checked (all ranks together)."""
    from ..runtime.distributed import agreed

    root = Path(root)
    if os.environ.get(SKIP_VARIABLE, "0") not in ("", "0"):
        return 0
    expected = agreed(lambda: _read(root))
    if expected is None:
        return 0
    names = sorted(n for n in expected if n.split("/", 1)[0] not in skip)
    rank, world = _share()
    checked = agreed(lambda: _verify(root, names[rank::world], expected))
    return sum(gathered({rank: checked}).values())


def _verify(root: Path, names: list[str], expected: dict) -> int:
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise ConfigError(f"{root / missing[0]} is missing, but {root / CHECKSUMS} lists it: "
                          f"{_DAMAGED}")
    found = digest(root, names)
    for name in names:
        size, crc = found[name]
        want_size, want_crc = expected[name]
        if size != want_size or crc != want_crc:
            what = (f"{size} bytes, {want_size} when saved" if size != want_size
                    else f"crc32 {crc}, {want_crc} when saved")
            raise ConfigError(f"{root / name} is corrupted ({what}): {_DAMAGED}")
    return sum(found[n][0] for n in names)


_DAMAGED = (f"copy the checkpoint again or use another one ({SKIP_VARIABLE}=1 loads it "
            "unchecked)")


def _read(root: Path) -> dict | None:
    path = root / CHECKSUMS
    if not path.is_file():
        log.debug("%s has no %s: loaded unchecked", root, CHECKSUMS)
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not all(
                isinstance(v, list) and len(v) == 2 for v in files.values()):
            raise ValueError(f"not a {ALGORITHM} list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} cannot be read ({err}): {_DAMAGED}") from None
    return files
