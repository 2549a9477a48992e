"""Logging: INFO on rank 0, warnings and errors from every rank (prefixed with the rank)."""

from __future__ import annotations

import logging
import os
import sys
import warnings


# Third-party warnings every rank repeats on every run, about nothing a user can change: internal
# deprecations inside megatron-core and torch, and a CUDA tuning hint (also printed on CPU, where
# it means nothing). Matched by message, from any module.
QUIET_WARNINGS = (
    r"full scope is deprecated",  # megatron's TransformerConfig default cuda_graph_scope
    r"Please use DTensor instead and we are deprecating ShardedTensor",  # dist_checkpointing
    r"`load_state_dict` is deprecated and will be removed",  # torch DCP via dist_checkpointing
    r"When using async grad allreduce it is recommended to set the environment variable "
    r"CUDA_DEVICE_MAX_CONNECTIONS",  # megatron's tp linear layers
    # the distributed optimizer: torch collectives megatron calls by their old names, and its
    # fp32 main parameters, views of the model's, whose .grad it reads
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)


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
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("megatron").setLevel(logging.WARNING)
