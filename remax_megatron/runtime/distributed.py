"""Process-group setup: torchrun's environment (or a plain single process), NCCL+CUDA or gloo+CPU,
megatron parallel_state with tp/pp (dp derived), and seeding.

This is the one place that talks to torch.distributed and megatron's parallel_state on startup.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from dataclasses import dataclass

import torch

from . import cpu_compat, lifetime
from .layout import LayoutError, ParallelLayout, validate_layout

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    layout: ParallelLayout
    cpu_compat: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    under_torchrun: bool


def read_launch_env(environ=None) -> LaunchEnv:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a single process when they are absent."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return LaunchEnv(rank=0, world_size=1, local_rank=0, under_torchrun=False)
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise LayoutError(
            f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK="
            f"{env.get('LOCAL_RANK')!r} must be integers: launch with torchrun or unset them"
        ) from None
    if not 0 <= rank < world:
        raise LayoutError(f"RANK={rank} is outside WORLD_SIZE={world}: launch with torchrun")
    return LaunchEnv(rank=rank, world_size=world, local_rank=local_rank, under_torchrun=True)


def choose_backend(requested: str = "auto", cuda_available: bool | None = None) -> str:
    """NCCL when GPUs are present, gloo otherwise; REMAX_BACKEND or ``requested`` overrides."""
    requested = os.environ.get("REMAX_BACKEND", requested)
    if requested not in BACKENDS:
        raise LayoutError(f"backend {requested!r} is unknown: use one of {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise LayoutError("backend nccl needs CUDA GPUs and none is visible: use backend=gloo")
    if requested == "gloo" and cuda:
        # megatron-core puts buffers on the GPU whenever CUDA is visible, whatever the backend
        raise LayoutError("backend gloo with CUDA GPUs visible: use nccl, or hide the GPUs "
                          "(CUDA_VISIBLE_DEVICES=) to run on the CPU")
    return requested


def seed_everything(seed: int, pp_rank: int = 0) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker.

    As in Megatron-LM, pipeline stages get distinct seeds (seed + 100 * pp_rank) so that dropout
    differs across stages; megatron's tracker further offsets the tensor-parallel stream by tp rank.
    """
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    try:
        import numpy as np

        np.random.seed(stage_seed)
    except ImportError:  # numpy is optional for us
        pass
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


def init_runtime(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str = "auto",
                 timeout_minutes: float = 30.0, model=None, ep: int = 1) -> Runtime:
    """Initialize torch.distributed and megatron parallel_state; idempotent for the same layout.

    ``model`` (a ModelConfig), when given, is checked against the layout before any group is made.
    """
    cpu_compat.import_megatron()
    from megatron.core import parallel_state

    env = read_launch_env()
    lifetime.install()  # before megatron starts any helper process
    layout = validate_layout(env.world_size, tp, pp, model, ep=ep)
    backend = choose_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
        compat = False
    else:
        device = torch.device("cpu")
        compat = cpu_compat.install()

    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if env.under_torchrun:
            # torchrun's store outlives a restart of the workers (--max-restarts): without a
            # prefix of its own, a restarted round reads the dead round's addresses (gloo:
            # "connectFullMesh failed ... Connection refused" with the static rendezvous)
            store, rank, world_size = next(torch.distributed.rendezvous("env://",
                                                                        timeout=timeout))
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            torch.distributed.init_process_group(
                backend=backend, store=torch.distributed.PrefixStore(f"restart_{restart}/", store),
                rank=rank, world_size=world_size, timeout=timeout)
        else:
            # A plain single process: an in-memory store, no MASTER_ADDR/MASTER_PORT needed.
            torch.distributed.init_process_group(
                backend=backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                timeout=timeout,
            )
    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size(),
                   parallel_state.get_expert_model_parallel_world_size())
        if current != (tp, pp, ep):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,  # experts' tensor parallelism: tp (megatron's default)
            distributed_timeout_minutes=timeout_minutes,  # a float works (a timedelta's)
        )
    seed_everything(seed, parallel_state.get_pipeline_model_parallel_rank())
    runtime = Runtime(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                      backend=backend, device=device, layout=layout, cpu_compat=compat)
    if runtime.is_main:
        log.info("runtime: %s backend, %s, %s", backend, device.type, layout)
    return runtime


def shutdown() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def single_process_runtime(seed: int = 1234):
    """tp=1, pp=1 on this process alone (for conversion tools); tears down only what it set up."""
    if read_launch_env().world_size > 1:
        raise LayoutError("this command runs as one process: launch it without torchrun")
    created = not torch.distributed.is_initialized()
    runtime = init_runtime(tp=1, pp=1, seed=seed)
    try:
        yield runtime
    finally:
        if created:
            shutdown()


def agreed(fn):
    """Run ``fn`` on every rank; if it raised a ConfigError on any, raise the first rank's on all
    of them, so that no rank goes on into a collective the others have left (a rule reward or a
    damaged file failing on one data-parallel rank must not leave the others waiting)."""
    from ..config_io import ConfigError

    error, result = None, None
    try:
        result = fn()
    except ConfigError as err:
        error = str(err)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ConfigError(error)
    return result
