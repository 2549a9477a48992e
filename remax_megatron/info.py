"""`remax-megatron info`: versions, backend, devices and (under torchrun) the parallel layout."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from . import __version__


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _apex_version() -> str | None:
    # NVIDIA apex is installed from source; the PyPI package named "apex" is unrelated.
    try:
        import apex  # noqa: F401
        from apex import amp  # noqa: F401  only NVIDIA's apex has these
    except Exception:
        return None
    return _version("apex") or "installed"


def _te_version() -> str | None:
    for dist in ("transformer-engine", "transformer_engine", "transformer-engine-torch"):
        version = _version(dist)
        if version:
            return version
    return None


def versions() -> list[tuple[str, str]]:
    cuda = torch.version.cuda or "none (CPU build)"
    return [
        ("remax-megatron", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {cuda})"),
        ("megatron-core", _version("megatron-core") or "NOT INSTALLED"),
        ("transformers", _version("transformers") or "NOT INSTALLED"),
        ("transformer-engine", _te_version() or "not installed (optional, GPU only)"),
        ("apex", _apex_version() or "not installed (optional, GPU only, from source)"),
    ]


def devices() -> list[tuple[str, str]]:
    rows = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB"))
    else:
        rows.append(("cuda", "not available"))
    rows.append(("cpu", f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"))
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_info(tp: int = 1, pp: int = 1, backend: str = "auto") -> str:
    """The report; under torchrun (or with --tp/--pp) it initializes the process groups."""
    from .runtime.distributed import choose_backend, init_runtime, read_launch_env, shutdown

    env = read_launch_env()
    chosen = choose_backend(backend)
    lines = ["versions:", _table(versions()), "devices:", _table(devices()),
             f"backend: {chosen} ({'auto' if backend == 'auto' else 'requested'})"]
    if not env.under_torchrun and (tp, pp) == (1, 1):
        lines.append("launch: single process (run under torchrun to see a parallel layout)")
        return "\n".join(lines)

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    runtime = init_runtime(tp=tp, pp=pp, backend=backend)
    me = (runtime.rank, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
          ps.get_data_parallel_rank(), str(runtime.device))
    everyone = [None] * runtime.world_size
    dist.all_gather_object(everyone, me)
    shutdown()
    lines.append(f"launch: torchrun, world size {runtime.world_size}, layout {runtime.layout}")
    lines.append(f"cpu compatibility layer: {'on' if runtime.cpu_compat else 'off'}")
    lines.append(_table([(f"rank {r}", f"tp {t}  pp {p}  dp {d}  {dev}")
                         for r, t, p, d, dev in everyone]))
    return "\n".join(lines) if runtime.is_main else ""
