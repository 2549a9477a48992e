"""The remax-megatron CLI with some file writes failing, as on a full disk or a read-only
directory (we run as root, so chmod stops nothing):

    checkpoint_faults.py ERRNO[:SKIP] GLOB[,GLOB...] -- CLI ARGS...

Every write-mode open, os.open with O_CREAT/O_WRONLY/O_RDWR, mkdir, rename target, torch.save
and safetensors save_file whose path matches a GLOB (fnmatch on the full path) raises
OSError(ERRNO), e.g. ENOSPC or EACCES, except the first SKIP such calls (default 0) of each
process. Forked writer processes inherit the patches."""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import sys


def install(code: str, patterns: list[str]) -> None:
    code, _, skip = code.partition(":")
    number = getattr(errno, code)
    left = [int(skip or 0)]  # matching calls still allowed to succeed

    def hit(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        text = os.fsdecode(os.fspath(path))
        if not any(fnmatch.fnmatch(text, pattern) for pattern in patterns):
            return False
        left[0] -= 1
        return left[0] < 0

    def fail(path):
        raise OSError(number, os.strerror(number), os.fsdecode(os.fspath(path)))

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and hit(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = open_

    real_os_open = os.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and hit(path):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    os.open = os_open

    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if hit(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    os.mkdir = mkdir

    for name in ("rename", "replace"):
        real = getattr(os, name)

        def move(src, dst, *args, _real=real, **kwargs):
            if hit(dst):
                fail(dst)
            return _real(src, dst, *args, **kwargs)

        setattr(os, name, move)

    import safetensors.torch
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if hit(f):
            fail(f)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save

    real_save_file = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if hit(filename):
            fail(filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file


def main() -> int:
    split = sys.argv.index("--")
    code, patterns = sys.argv[1], sys.argv[2].split(",")
    install(code, patterns)
    from remax_megatron.cli import main as cli

    return cli(sys.argv[split + 1:])


if __name__ == "__main__":  # megatron's writer starts spawned helpers that import this module
    sys.exit(main())
