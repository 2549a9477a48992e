"""Logging: INFO on rank 0, warnings and errors from every rank (prefixed with the rank)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(level: str = "INFO") -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    ours = logging.getLogger("remax_megatron")
    ours.setLevel(level if rank == 0 else logging.WARNING)
    # megatron-core announces missing optional GPU packages on import; we report them in `info`.
    warnings.filterwarnings("ignore", message=r"(Apex|Transformer Engine)\b.*not installed")
    logging.getLogger("megatron").setLevel(logging.WARNING)
