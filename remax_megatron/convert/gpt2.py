"""GPT-2 (GPT2LMHeadModel, GPT2ForSequenceClassification) <-> megatron-core.

HF's Conv1D stores weights as [in, out]: every one is transposed. c_attn holds [Q; K; V] for all
heads; megatron wants them grouped per head.
"""

from __future__ import annotations

import torch

from ..models.config import ModelConfig
from .qkv import fuse_qkv, split_qkv
from .rules import Rule, head_rules, same, transposed

IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints


def rules(c: ModelConfig, reward: bool) -> list[Rule]:
    heads, d = c.num_attention_heads, c.kv_channels

    def c_attn_to_mcore(t: torch.Tensor) -> torch.Tensor:  # [h, 3h] weight or [3h] bias
        rows = t.t() if t.dim() == 2 else t
        return fuse_qkv(*rows.chunk(3, 0), heads, heads, d)

    def c_attn_to_hf(t: torch.Tensor) -> tuple[torch.Tensor]:
        rows = torch.cat(split_qkv(t, heads, heads, d), 0)
        return (rows.t() if rows.dim() == 2 else rows,)

    out = [same("embedding.word_embeddings.weight", "transformer.wte.weight"),
           same("embedding.position_embeddings.weight", "transformer.wpe.weight")]
    for i in range(c.num_layers):
        m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        out += [
            same(m + "input_layernorm.weight", h + "ln_1.weight"),
            same(m + "input_layernorm.bias", h + "ln_1.bias"),
            Rule(m + "self_attention.linear_qkv.weight", (h + "attn.c_attn.weight",),
                 c_attn_to_mcore, c_attn_to_hf),
            Rule(m + "self_attention.linear_qkv.bias", (h + "attn.c_attn.bias",),
                 c_attn_to_mcore, c_attn_to_hf),
            transposed(m + "self_attention.linear_proj.weight", h + "attn.c_proj.weight"),
            same(m + "self_attention.linear_proj.bias", h + "attn.c_proj.bias"),
            same(m + "pre_mlp_layernorm.weight", h + "ln_2.weight"),
            same(m + "pre_mlp_layernorm.bias", h + "ln_2.bias"),
            transposed(m + "mlp.linear_fc1.weight", h + "mlp.c_fc.weight"),
            same(m + "mlp.linear_fc1.bias", h + "mlp.c_fc.bias"),
            transposed(m + "mlp.linear_fc2.weight", h + "mlp.c_proj.weight"),
            same(m + "mlp.linear_fc2.bias", h + "mlp.c_proj.bias"),
        ]
    out += [same("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
            same("decoder.final_layernorm.bias", "transformer.ln_f.bias")]
    return out + head_rules(reward, c.tie_word_embeddings)


def hf_shapes(c: ModelConfig, reward: bool) -> dict[str, tuple[int, ...]]:
    h, f = c.hidden_size, c.ffn_hidden_size
    shapes = {"transformer.wte.weight": (c.vocab_size, h),
              "transformer.wpe.weight": (c.max_position_embeddings, h),
              "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,),
              "score.weight": (1, h), "lm_head.weight": (c.vocab_size, h)}
    for i in range(c.num_layers):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "ln_2.weight": (h,),
            p + "ln_2.bias": (h,), p + "attn.c_attn.weight": (h, 3 * h),
            p + "attn.c_attn.bias": (3 * h,), p + "attn.c_proj.weight": (h, h),
            p + "attn.c_proj.bias": (h,), p + "mlp.c_fc.weight": (h, f), p + "mlp.c_fc.bias": (f,),
            p + "mlp.c_proj.weight": (f, h), p + "mlp.c_proj.bias": (h,),
        })
    return shapes


def normalize_hf_name(name: str) -> str | None:
    """Canonical HF name (``transformer.`` prefix), or None for a buffer that is not a weight."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if name.startswith(("h.", "wte.", "wpe.", "ln_f.")):
        return "transformer." + name  # original OpenAI-converted checkpoints have no prefix
    return name
