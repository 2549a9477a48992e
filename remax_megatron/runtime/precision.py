"""Which reduced precisions this machine runs natively: bf16 on GPUs that have it and on CPUs
with AVX512-BF16 or AMX (oneDNN's bf16 kernels); fp16 only on GPUs."""

from __future__ import annotations

import torch

from ..config_io import ConfigError


def cpu_bf16_supported() -> bool:
    """oneDNN has native bf16 kernels for this CPU (elsewhere torch emulates bf16, slowly)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_supported()


def check_precision(name: str, setting: str) -> None:
    """One line when ``setting`` asks for a dtype this machine cannot run natively."""
    if name in ("fp16", "float16") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}=fp16 needs a GPU (CPUs have no fp16 matmul kernels): use "
                          "bf16 or fp32 here")
    if name in ("bf16", "bfloat16") and not bf16_supported():
        where = "GPU" if torch.cuda.is_available() else "CPU (it needs AVX512-BF16 or AMX)"
        raise ConfigError(f"{setting}=bf16: this {where} has no native bf16 support: use fp32")
