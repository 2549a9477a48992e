"""A KV cache whose prompt part is shared by every continuation of the prompt.

Each layer keeps one buffer per prompt, [B, groups, P + k*T, d]: the prompt's keys/values once
(positions 0..P-1), then the generated keys/values of its k continuation rows (k per prompt, e.g.
ReMax's greedy and sampled answer) interleaved by step: continuation c's token of step s sits at
P + s*k + c. A decode step attends over the first P + (s+1)*k positions with one
scaled_dot_product_attention call, each continuation masked to its prompt's real tokens and its
own generated ones; no prompt key/value is copied or recomputed for the second continuation.
Prefill and decode may run on a contiguous group of prompts at a time (``prompts``, a slice;
pipelined rollout).

Static decoding (``static=True``, for CUDA graphs): every step has the same shapes and reads its
step from a device tensor (``set_static_step``); its keys/values go in with index_copy_ and
attention runs over the whole buffer, the positions past the step masked (zero-initialized, so
no stale memory can turn a masked score into NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import padded_causal_attention


class SharedPrefixKVCache:
    def __init__(self, num_layers: int, prompt_mask: torch.Tensor, continuations: int,
                 max_new_tokens: int, groups: int, head_dim: int, dtype: torch.dtype,
                 static: bool = False):
        batch, prompt_len = prompt_mask.shape
        device = prompt_mask.device
        self.k = continuations
        self.prompt_len = prompt_len
        self.prompt_real = prompt_mask.bool()  # [B, P] keys that are real prompt tokens
        self.scale = 1.0 / math.sqrt(head_dim)
        shape = (batch, groups, prompt_len + continuations * max_new_tokens, head_dim)
        alloc = torch.zeros if static else torch.empty
        self.keys = [alloc(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [alloc(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._static = None  # (slots [k], mask [B, 1, k * per, P + k*T]) of the current step
        # No mask at all where every key up to the current step is visible to every query:
        # unpadded prompts and a single continuation.
        self._masked = continuations > 1 or not bool(self.prompt_real.all())
        self._decode_mask = None  # [B, 1, k * heads_per_group, P + k*T], built on first decode
        self._prefill_masks = {}

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                prompts: slice = slice(None)) -> torch.Tensor:
        """Attention over the prompts (causal, padded keys masked); stores their keys/values.

        q [P, B, heads, d], k/v [P, B, groups, d] -> context [P, B, heads * d].
        """
        p = self.prompt_len
        self.keys[layer][prompts, :, :p] = k.permute(1, 2, 0, 3)
        self.values[layer][prompts, :, :p] = v.permute(1, 2, 0, 3)
        key = (prompts.start, prompts.stop)
        if key not in self._prefill_masks:  # the same for every layer
            self._prefill_masks[key] = self.prompt_real[prompts]
        return padded_causal_attention(q, k, v, self._prefill_masks[key])

    def decode(self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, prompts: slice = slice(None)) -> torch.Tensor:
        """One new token per row: q [1, R, heads, d], k/v [1, R, groups, d] -> [1, R, heads * d]."""
        _, rows, heads, d = q.shape
        groups = k.size(2)
        per = heads // groups
        slot = self.prompt_len + step * self.k
        length = slot + self.k
        keys, values = self.keys[layer], self.values[layer]
        whole = prompts.start in (None, 0) and prompts.stop in (None, keys.size(0))
        if not whole:
            keys, values = keys[prompts], values[prompts]  # views
        if self.k == 1:  # rows are prompts; a group's queries are its heads
            keys.select(2, slot).copy_(k[0])
            values.select(2, slot).copy_(v[0])
            q = q[0].view(rows, groups, per, d)
        else:
            keys.narrow(2, slot, self.k).copy_(self._per_prompt(k))
            values.narrow(2, slot, self.k).copy_(self._per_prompt(v))
            q = self._grouped_queries(q)
        if q.stride(-1) != 1:  # transposed products upstream (forward._columns)
            q = q.contiguous()
        mask = None
        if self._masked:
            mask = self._mask(per)
            mask = (mask if whole else mask[prompts]).narrow(3, 0, length)
        out = F.scaled_dot_product_attention(q, keys.narrow(2, 0, length),
                                             values.narrow(2, 0, length), attn_mask=mask,
                                             scale=self.scale)
        if self.k > 1:
            out = out.unflatten(2, (self.k, per)).transpose(1, 2)  # [B, k, groups, per, d]
        return out.reshape(1, rows, heads * d)

    def _per_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """A step's keys or values [1, R, groups, d] as [B, groups, k, d] (rows prompt-major)."""
        _, rows, groups, d = x.shape
        return x[0].view(rows // self.k, self.k, groups, d).transpose(1, 2)

    def _grouped_queries(self, q: torch.Tensor) -> torch.Tensor:
        """q [1, R, heads, d] -> [B, groups, k * per, d]: the queries of one key/value group are
        its heads of every continuation of the prompt."""
        _, rows, heads, d = q.shape
        batch, groups = rows // self.k, self.keys[0].size(1)
        per = heads // groups
        q = q[0].view(batch, self.k, groups, per, d).transpose(1, 2)
        return q.reshape(batch, groups, self.k * per, d)

    def set_static_step(self, step: torch.Tensor, per: int) -> None:
        """The decode step of the next decode_static calls, from a 0-dim long device tensor
        (``per``: query heads per key/value group): its slots and visible keys."""
        length = self.keys[0].size(2)
        first = self.prompt_len + step * self.k
        slots = first + torch.arange(self.k, device=step.device)
        visible = torch.arange(length, device=step.device) < first + self.k
        self._static = (slots, self._mask(per) & visible)

    def decode_static(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
        """``decode`` of the whole batch at the step given to set_static_step, with the same
        shapes at every step (see the module's doc)."""
        _, rows, heads, d = q.shape
        per = heads // k.size(2)
        slots, mask = self._static
        self.keys[layer].index_copy_(2, slots, self._per_prompt(k))
        self.values[layer].index_copy_(2, slots, self._per_prompt(v))
        out = F.scaled_dot_product_attention(self._grouped_queries(q), self.keys[layer],
                                             self.values[layer], attn_mask=mask, scale=self.scale)
        out = out.unflatten(2, (self.k, per)).transpose(1, 2)  # [B, k, groups, per, d]
        return out.reshape(1, rows, heads * d)

    def _mask(self, per: int) -> torch.Tensor:
        """[B, 1, k * per, P + k*T] bool: query row c*per + j (continuation c) sees its prompt's
        real keys and the generated keys of continuation c."""
        if self._decode_mask is None:
            batch, groups, length, _ = self.keys[0].shape
            device = self.prompt_real.device
            generated = torch.arange(length - self.prompt_len, device=device) % self.k
            own = generated[None, :] == torch.arange(self.k, device=device)[:, None]  # [k, k*T]
            allowed = torch.cat([self.prompt_real[:, None, :].expand(-1, self.k, -1),
                                 own.expand(batch, -1, -1)], dim=-1)  # [B, k, P + k*T]
            self._decode_mask = allowed.repeat_interleave(per, dim=1).unsqueeze(1).contiguous()
        return self._decode_mask
