"""megatron-core's fused QKV layout: rows grouped per key/value group,
[q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...], each head ``head_dim`` rows.
Pure tensor functions (weights [rows, hidden] or biases [rows])."""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_groups: int, head_dim: int) -> torch.Tensor:
    """Separate q [nh*d, ...], k and v [ng*d, ...] -> megatron's grouped [(nh + 2ng)*d, ...]."""
    rest = q.shape[1:]
    per_group = num_heads // num_groups
    q = q.reshape(num_groups, per_group * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, num_heads: int, num_groups: int, head_dim: int):
    """Inverse of ``fuse_qkv``: (q, k, v), each contiguous."""
    rest = fused.shape[1:]
    per_group = num_heads // num_groups
    grouped = fused.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())
