"""Attention over a padded batch with per-row padding (no cache): causal, padded keys masked."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def padded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_mask: torch.Tensor) -> torch.Tensor:
    """q [s, b, heads, d], k/v [s, b, groups, d], key_mask [b, s] (1 = real token)
    -> context [s, b, heads * d] (megatron's layout for linear_proj)."""
    seq, batch, heads, d = q.shape
    rep = heads // k.size(2)
    keys = k.permute(1, 2, 0, 3).repeat_interleave(rep, dim=1)
    values = v.permute(1, 2, 0, 3).repeat_interleave(rep, dim=1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    allowed = causal & key_mask.bool()[:, None, None, :]
    # A padding query sees no real key; letting it see itself keeps its (unused) output finite.
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), keys, values, attn_mask=allowed,
                                         scale=1.0 / math.sqrt(d))
    return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * d)
