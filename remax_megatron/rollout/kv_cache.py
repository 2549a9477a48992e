"""A KV cache whose prompt part is shared by every continuation of the prompt.

Keys/values of the B prompts are stored once ([B, groups, P, d] per layer); each of the B*k
continuation rows (k per prompt, e.g. ReMax's greedy and sampled answer) keeps only its own
generated keys/values ([B, k, groups, T, d]). A decode step attends over both parts; no prompt
key/value is copied or recomputed for the second continuation. Prefill and decode may run on a
contiguous group of prompts at a time (``prompts``, a slice; pipelined rollout).
"""

from __future__ import annotations

import math

import torch

from .attention import padded_causal_attention


class SharedPrefixKVCache:
    def __init__(self, num_layers: int, prompt_mask: torch.Tensor, continuations: int,
                 max_new_tokens: int, groups: int, head_dim: int, dtype: torch.dtype):
        batch, prompt_len = prompt_mask.shape
        device = prompt_mask.device
        self.k = continuations
        self.prompt_real = prompt_mask.bool()  # [B, P] keys that are real prompt tokens
        self.scale = 1.0 / math.sqrt(head_dim)
        shape_p = (batch, groups, prompt_len, head_dim)
        shape_g = (batch, continuations, groups, max_new_tokens, head_dim)
        self.prompt_k = [torch.empty(shape_p, dtype=dtype, device=device) for _ in range(num_layers)]
        self.prompt_v = [torch.empty(shape_p, dtype=dtype, device=device) for _ in range(num_layers)]
        self.gen_k = [torch.empty(shape_g, dtype=dtype, device=device) for _ in range(num_layers)]
        self.gen_v = [torch.empty(shape_g, dtype=dtype, device=device) for _ in range(num_layers)]

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                prompts: slice = slice(None)) -> torch.Tensor:
        """Attention over the prompts (causal, padded keys masked); stores their keys/values.

        q [P, B, heads, d], k/v [P, B, groups, d] -> context [P, B, heads * d].
        """
        self.prompt_k[layer][prompts] = k.permute(1, 2, 0, 3)
        self.prompt_v[layer][prompts] = v.permute(1, 2, 0, 3)
        return padded_causal_attention(q, k, v, self.prompt_real[prompts])

    def decode(self, layer: int, step: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, prompts: slice = slice(None)) -> torch.Tensor:
        """One new token per row: q [1, R, heads, d], k/v [1, R, groups, d] -> [1, R, heads * d]."""
        _, rows, heads, d = q.shape
        groups = k.size(2)
        batch = rows // self.k
        gen_k, gen_v = self.gen_k[layer][prompts], self.gen_v[layer][prompts]  # views
        prompt_k, prompt_v = self.prompt_k[layer][prompts], self.prompt_v[layer][prompts]
        prompt_real = self.prompt_real[prompts]
        gen_k[:, :, :, step] = k[0].view(batch, self.k, groups, d)
        gen_v[:, :, :, step] = v[0].view(batch, self.k, groups, d)
        # scaled before the product (as megatron's attention does): no fp16 overflow
        q = q[0].view(batch, self.k, groups, heads // groups, d) * self.scale
        scores_p = torch.einsum("bkgrd,bgpd->bkgrp", q, prompt_k).float()
        scores_p = scores_p.masked_fill(~prompt_real[:, None, None, None, :], float("-inf"))
        scores_g = torch.einsum("bkgrd,bkgtd->bkgrt", q, gen_k[:, :, :, :step + 1]).float()
        probs = torch.softmax(torch.cat([scores_p, scores_g], dim=-1), dim=-1)
        probs = probs.to(q.dtype)
        prompt_len = scores_p.size(-1)
        out = torch.einsum("bkgrp,bgpd->bkgrd", probs[..., :prompt_len], prompt_v)
        out = out + torch.einsum("bkgrt,bkgtd->bkgrd", probs[..., prompt_len:],
                                 gen_v[:, :, :, :step + 1])
        return out.reshape(1, rows, heads * d)
