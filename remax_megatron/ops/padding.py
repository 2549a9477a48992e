"""Padded batches: position ids and megatron attention masks from a [batch, seq] padding mask.

Rows may be left-padded (prompts for generation), right-padded (training sequences) or both;
positions count real tokens only, as transformers' generate does.
"""

from __future__ import annotations

import torch


def right_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> torch.Tensor:
    """[rows, width] token ids, each sequence followed by ``pad_id`` (width: the longest)."""
    width = width or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """[b, s] 0/1 mask -> [b, s] positions: 0 at each row's first real token, clamped at 0 before."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """[b, s] 0/1 mask -> megatron's [b, 1, s, s] boolean mask, True where attention is blocked:
    future positions and padded keys."""
    seq = mask.size(-1)
    future = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).triu(1)
    padded_key = ~mask.bool()[:, None, None, :]
    return future[None, None] | padded_key
