"""Outputs kept apart from inputs: no verb writes over, around or into what it reads.

A path is compared by what it points to (symlinks and ``..`` resolved), so ``--out ./m`` and
``--hf m/`` or a link to it are the same directory. File-system checks only: they run before any
model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config_io import ConfigError


def real(path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def overlap(output, source) -> str | None:
    """How ``output`` overlaps ``source``: "is", "contains", "lies inside", or None."""
    out, src = real(output), real(source)
    if out == src:
        return "is"
    if src.is_relative_to(out):
        return "contains"
    if out.is_relative_to(src):
        return "lies inside"
    return None


def check_apart(out_flag: str, output, inputs: dict) -> None:
    """One line when ``output`` (given with ``out_flag``) is, contains or lies inside one of
    ``inputs`` ({flag: path}; None values skipped): writing it could replace or damage that
    input (a directory output is replaced as a whole)."""
    for flag, source in inputs.items():
        if source is None:
            continue
        how = overlap(output, source)
        if how is not None:
            what = "the same path as" if how == "is" else f"{how}"
            raise ConfigError(f"{out_flag} {output} {what} {flag} {source}: writing it could "
                              f"replace what it reads; choose an {out_flag} apart from the input")
