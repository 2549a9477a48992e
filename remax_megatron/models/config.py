"""The model config: one dataclass for the GPT-2 and Llama families, YAML round-trippable.

It describes the network only (no parallel layout, no dtype); ``transformer_config`` turns it plus
a layout into megatron-core's ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..config_io import ConfigError
from .rope import check_rope_scaling

FAMILIES = ("gpt2", "llama")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu_tanh", "gelu", "swiglu")
POSITION_EMBEDDINGS = ("learned", "rope")


@dataclass
class ModelConfig:
    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int  # the tokenizer's true vocabulary; the embedding is padded beyond it
    max_position_embeddings: int
    num_key_value_heads: Optional[int] = None  # None: as many as attention heads (no GQA)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    norm: str = "layernorm"
    norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"
    position_embedding: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # None: plain RoPE; else models/rope.py (llama3, linear)
    add_bias_linear: bool = True
    add_qkv_bias: bool = True
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query / key head, before RoPE
    tie_word_embeddings: bool = True
    # mixture of experts (None: a dense MLP in every layer): each token goes to moe_topk of
    # num_experts SwiGLU experts of moe_ffn_hidden_size, weighted by the router's softmax
    num_experts: Optional[int] = None
    moe_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # None: ffn_hidden_size
    # the top-k probabilities renormalized to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob);
    # False: the softmax over all experts, top-k taken as they are (Qwen2-MoE)
    moe_renormalize: bool = True
    moe_shared_expert_ffn_hidden_size: Optional[int] = None  # Qwen2-MoE's shared expert
    moe_shared_expert_gate: bool = False  # its sigmoid gate
    moe_aux_loss_coef: float = 0.0  # the load-balancing loss's weight (HF router_aux_loss_coef)
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0  # RLHF runs without dropout: log-probs must be deterministic
    attention_dropout: float = 0.0

    def __post_init__(self):
        self.validate()

    # --- families -------------------------------------------------------------------------------
    @classmethod
    def gpt2(cls, **overrides) -> "ModelConfig":
        """GPT-2: LayerNorm, learned positions, tanh GELU, biases everywhere, tied embeddings."""
        defaults = dict(
            family="gpt2", norm="layernorm", norm_epsilon=1e-5, activation="gelu_tanh",
            position_embedding="learned", add_bias_linear=True, add_qkv_bias=True,
            tie_word_embeddings=True,
        )
        defaults.update(overrides)
        defaults.setdefault("ffn_hidden_size", 4 * defaults["hidden_size"])
        return cls(**defaults)

    @classmethod
    def llama(cls, **overrides) -> "ModelConfig":
        """Llama: RMSNorm, RoPE, SwiGLU, GQA, no biases, untied embeddings unless told."""
        defaults = dict(
            family="llama", norm="rmsnorm", norm_epsilon=1e-6, activation="swiglu",
            position_embedding="rope", add_bias_linear=False, add_qkv_bias=False,
            tie_word_embeddings=False,
        )
        defaults.update(overrides)
        return cls(**defaults)

    # --- derived --------------------------------------------------------------------------------
    @property
    def num_query_groups(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab rounded up to a multiple of make_vocab_size_divisible_by * tp (megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    # --- checks ---------------------------------------------------------------------------------
    def validate(self) -> None:
        def choose(name, value, allowed):
            if value not in allowed:
                raise ConfigError(
                    f"model.{name}={value!r} is not supported; use one of: {', '.join(allowed)}"
                )

        choose("family", self.family, FAMILIES)
        choose("norm", self.norm, NORMS)
        choose("activation", self.activation, ACTIVATIONS)
        choose("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        check_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None and self.position_embedding != "rope":
            raise ConfigError("model.rope_scaling needs position_embedding=rope: remove it")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}: change one, or set head_dim"
            )
        if self.qk_norm and self.norm != "rmsnorm":
            raise ConfigError("model.qk_norm needs norm=rmsnorm (Qwen3's q/k norms are RMSNorms)")
        self._validate_moe()
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_query_groups}: GQA needs whole groups of heads"
            )

    def _validate_moe(self) -> None:
        if not self.is_moe:
            extra = [name for name in ("moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size")
                     if getattr(self, name) is not None]
            if extra or self.moe_shared_expert_gate:
                raise ConfigError(f"model.{(extra or ['moe_shared_expert_gate'])[0]} needs "
                                  "model.num_experts: set it, or remove the MoE settings")
            return
        for name in ("num_experts", "moe_topk", "moe_ffn_hidden_size",
                     "moe_shared_expert_ffn_hidden_size"):
            value = getattr(self, name)
            if value is None and name != "num_experts":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.moe_topk > self.num_experts:
            raise ConfigError(f"model.moe_topk={self.moe_topk} exceeds num_experts="
                              f"{self.num_experts}: route each token to at most every expert")
        if self.activation != "swiglu":
            raise ConfigError("mixture-of-experts models need activation=swiglu (the experts are "
                              "SwiGLU MLPs)")
        if self.moe_shared_expert_gate and self.moe_shared_expert_ffn_hidden_size is None:
            raise ConfigError("model.moe_shared_expert_gate needs "
                              "moe_shared_expert_ffn_hidden_size (the shared expert it gates)")
        coef = self.moe_aux_loss_coef
        if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not 0 <= coef < 1e3:
            raise ConfigError(f"model.moe_aux_loss_coef must be a finite number >= 0, got "
                              f"{coef!r}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
