"""RoPE frequency scaling (Llama 3.x's "llama3", and "linear"), as pure functions of the config.

megatron-core's own llama3 option fixes low/high_freq_factor and the original context (1, 4, 8192);
computing the inverse frequencies here takes every value a config.json carries, and the builder
puts them into megatron's RotaryEmbedding, which every forward (training, rollout, reward) reads.
"""

from __future__ import annotations

import math

import torch

from ..config_io import ConfigError

ROPE_TYPES = ("linear", "llama3")
REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: dict | None) -> None:
    """One-line errors for a rope_scaling dict this package cannot apply."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"model.rope_scaling must be a mapping, got {scaling!r}")
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"RoPE scaling {rope_type!r} is not supported: use one of "
                          f"{', '.join(ROPE_TYPES)} (or none, for plain RoPE)")
    missing = [k for k in REQUIRED_KEYS[rope_type] if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ConfigError(f"RoPE scaling {rope_type!r} needs numeric {', '.join(missing)}")
    unknown = sorted(set(scaling) - {"rope_type", *REQUIRED_KEYS[rope_type]})
    if unknown:
        raise ConfigError(f"RoPE scaling {rope_type!r} has keys this package does not apply: "
                          f"{', '.join(unknown)}; remove them or convert without scaling")
    if scaling["factor"] <= 0:
        raise ConfigError(f"RoPE scaling factor must be > 0, got {scaling['factor']}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError("RoPE scaling llama3 needs high_freq_factor > low_freq_factor")


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """Plain RoPE inverse frequencies -> the scaled ones (unchanged when ``scaling`` is None)."""
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, out)


def hf_rope_scaling(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from a config.json: transformers >= 5 writes
    ``rope_parameters``; older configs ``rope_theta`` and ``rope_scaling`` at the top level."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type in ROPE_TYPES and params.get("attention_factor", 1.0) == 1.0:
        params.pop("attention_factor", None)
    if rope_type == "linear":
        # transformers' own defaults for keys a linear config does not use
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            params.pop(key, None)
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    scaling = {"rope_type": rope_type, **params}
    check_rope_scaling(scaling)
    return theta, scaling


def hf_rope_parameters(theta: float, scaling: dict | None) -> dict:
    """The ``rope_parameters`` entry of an exported config.json."""
    return {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
