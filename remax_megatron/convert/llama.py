"""Llama (and Mistral, Qwen2, Qwen3) causal LMs and sequence classifiers <-> megatron-core.

HF's rotate-half RoPE equals megatron's non-interleaved RoPE: q/k rows are not permuted, only
grouped per key/value group. SwiGLU's gate and up projections stack into linear_fc1 = [gate; up].
"""

from __future__ import annotations

from ..models.config import ModelConfig
from .qkv import fuse_qkv, split_qkv
from .rules import Rule, head_rules, same, stacked

IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # a buffer in old checkpoints


def dense_mlp(c: ModelConfig, m: str, p: str) -> list[Rule]:
    """One layer's SwiGLU MLP: fc1 = [gate; up], fc2 = down."""
    return [stacked(m + "mlp.linear_fc1.weight", (p + "mlp.gate_proj.weight",
                                                  p + "mlp.up_proj.weight")),
            same(m + "mlp.linear_fc2.weight", p + "mlp.down_proj.weight")]


def rules(c: ModelConfig, reward: bool, mlp=dense_mlp) -> list[Rule]:
    """The whole model; ``mlp(c, mcore_prefix, hf_prefix)`` gives each layer's MLP rules (the
    mixture-of-experts families pass their own)."""
    nh, ng, d = c.num_attention_heads, c.num_query_groups, c.kv_channels

    def qkv(mcore: str, attn: str, kind: str) -> Rule:
        return Rule(mcore, tuple(f"{attn}{x}_proj.{kind}" for x in "qkv"),
                    lambda q, k, v: fuse_qkv(q, k, v, nh, ng, d),
                    lambda t: split_qkv(t, nh, ng, d))

    out = [same("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(c.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out += [same(m + "input_layernorm.weight", p + "input_layernorm.weight"),
                qkv(m + "self_attention.linear_qkv.weight", p + "self_attn.", "weight")]
        if c.add_qkv_bias:
            out.append(qkv(m + "self_attention.linear_qkv.bias", p + "self_attn.", "bias"))
        if c.qk_norm:
            out += [same(m + "self_attention.q_layernorm.weight", p + "self_attn.q_norm.weight"),
                    same(m + "self_attention.k_layernorm.weight", p + "self_attn.k_norm.weight")]
        out += [
            same(m + "self_attention.linear_proj.weight", p + "self_attn.o_proj.weight"),
            same(m + "pre_mlp_layernorm.weight", p + "post_attention_layernorm.weight"),
            *mlp(c, m, p),
        ]
    out.append(same("decoder.final_layernorm.weight", "model.norm.weight"))
    return out + head_rules(reward, c.tie_word_embeddings)


def hf_shapes(c: ModelConfig, reward: bool) -> dict[str, tuple[int, ...]]:
    h, f, d = c.hidden_size, c.ffn_hidden_size, c.kv_channels
    q, kv = c.num_attention_heads * d, c.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,),
              "score.weight": (1, h), "lm_head.weight": (c.vocab_size, h)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
        })
    return shapes


def normalize_hf_name(name: str) -> str | None:
    if name.endswith(IGNORED_SUFFIXES):
        return None
    return name
