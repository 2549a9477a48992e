"""Exact bytes of model state on this rank: parameters, gradient buffers, optimizer states.

This is the ReMax paper's "in principle" memory: PPO holds a trainable critic (its weights,
gradients and Adam moments, plus fp32 main weights under bf16) that ReMax does not. Activations,
KV caches and allocator slack come on top and are measured separately (peak memory).
"""

from __future__ import annotations

import torch

from ..models.builder import model_chunks, unwrap


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizers(optimizer) -> list:
    """The torch optimizers under megatron's (chained, fp32, fp16, distributed) wrappers."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in chained]


def model_state_bytes(model, ddp=None, optimizer=None) -> dict[str, int]:
    """{"params", "grads", "optimizer", "total"} in bytes for one model (or its virtual pipeline
    chunks) on this rank.

    optimizer: Adam's moments and any main-parameter copies it steps (fp32 copies of bf16
    weights, distributed-optimizer shards); the model's own parameters are not counted twice.
    """
    params = [p for chunk in model_chunks(model) for p in unwrap(chunk).parameters()]
    out = {"params": _bytes(params), "grads": 0, "optimizer": 0}
    if ddp is not None:
        out["grads"] = _bytes(b.grad_data for chunk in model_chunks(ddp) for b in chunk.buffers)
    if optimizer is not None:
        own = {p.untyped_storage().data_ptr() for p in params}
        for opt in _optimizers(optimizer):
            for group in opt.param_groups:
                out["optimizer"] += _bytes(p for p in group["params"]
                                           if p.untyped_storage().data_ptr() not in own)
            for state in opt.state.values():
                out["optimizer"] += _bytes(v for v in state.values()
                                           if torch.is_tensor(v) and v.dim() > 0)
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def human(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_states(states: dict[str, dict[str, int]]) -> str:
    """One line: each model's total and its split."""
    parts = [f"{name} {human(s['total'])} (params {human(s['params'])}, grads "
             f"{human(s['grads'])}, optimizer {human(s['optimizer'])})"
             for name, s in states.items()]
    total = sum(s["total"] for s in states.values())
    return f"model states on rank 0: {'; '.join(parts)}; total {human(total)}"
