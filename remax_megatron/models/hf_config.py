"""Map a Hugging Face config.json (as a dict) onto our ModelConfig, and back.

Supported: GPT2LMHeadModel, LlamaForCausalLM and its variants (MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM with its q/k norms), the mixture-of-experts
MixtralForCausalLM, Qwen2MoeForCausalLM (with its gated shared expert) and Qwen3MoeForCausalLM,
and as reward models
GPT2ForSequenceClassification / LlamaForSequenceClassification (and the Mistral / Qwen2 / Qwen3
ones) with num_labels 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config_io import ConfigError
from .config import ModelConfig
from .rope import hf_rope_parameters, hf_rope_scaling

log = logging.getLogger(__name__)

CAUSAL_LM = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
REWARD = {
    "GPT2ForSequenceClassification": "gpt2",
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
}
SUPPORTED = tuple(CAUSAL_LM) + tuple(REWARD)
QKV_BIAS = ("qwen2", "qwen2_moe")
QK_NORM = ("qwen3", "qwen3_moe")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class HFModelInfo:
    config: ModelConfig
    architecture: str
    model_type: str  # gpt2 | llama | mistral | qwen2 | qwen3 | mixtral | qwen2_moe | qwen3_moe
    is_reward: bool


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if archs:
        return archs[0]
    raise ConfigError(
        "config.json has no 'architectures' entry: add the model class, one of "
        + ", ".join(SUPPORTED)
    )


def _gpt2(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    activations = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    if act not in activations:
        raise ConfigError(f"GPT-2 activation_function {act!r} is not supported: use gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ConfigError("GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                          "are not supported: set them false")
    hidden = hf["n_embd"]
    return ModelConfig.gpt2(
        num_layers=hf["n_layer"], hidden_size=hidden, num_attention_heads=hf["n_head"],
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden, vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["n_positions"], norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation=activations[act], tie_word_embeddings=hf.get("tie_word_embeddings", True),
        init_method_std=hf.get("initializer_range", 0.02),
    )


def _llama_like(hf: dict, model_type: str) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported for {model_type}: SwiGLU needs silu")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported: Llama MLPs here have no biases")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // heads:
        head_dim = None  # the default: keep configs minimal
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < hf.get("max_position_embeddings", 0):
        log.warning("%s sliding_window=%d is not applied: sequences longer than it will "
                    "differ from transformers", model_type, window)
    if hf.get("attention_bias") and model_type not in QKV_BIAS:
        # Llama's / Qwen3's attention_bias also biases o_proj, which megatron ties to MLP biases.
        raise ConfigError(f"attention_bias=true is not supported for {model_type}: set it false")
    qkv_bias = model_type in QKV_BIAS
    theta, scaling = hf_rope_scaling(hf)
    return ModelConfig.llama(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, ffn_hidden_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        add_qkv_bias=qkv_bias, add_bias_linear=False, qk_norm=model_type in QK_NORM,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02),
        **(_moe(hf, model_type) if model_type in MOE else {}),
    )


def _moe(hf: dict, model_type: str) -> dict:
    """The mixture-of-experts settings of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json."""
    if hf.get("router_jitter_noise"):
        raise ConfigError("router_jitter_noise is not supported: set it 0 (RL needs the same "
                          "routing in rollout and training)")
    if model_type == "mixtral":
        # softmax over the experts, top-k, renormalized: megatron's top-k, then softmax
        return dict(num_experts=hf["num_local_experts"], moe_topk=hf["num_experts_per_tok"],
                    moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise ConfigError(f"{model_type} with dense layers (decoder_sparse_step="
                          f"{hf.get('decoder_sparse_step', 1)}, mlp_only_layers="
                          f"{hf.get('mlp_only_layers')}) is not supported: every layer must be "
                          "a mixture of experts (decoder_sparse_step 1, mlp_only_layers [])")
    # the Hub's configs say num_experts; transformers 5 writes num_local_experts
    experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
    out = dict(num_experts=experts, moe_topk=hf["num_experts_per_tok"],
               moe_ffn_hidden_size=hf["moe_intermediate_size"],
               moe_renormalize=bool(hf.get("norm_topk_prob", False)),
               moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)))
    if model_type == "qwen2_moe":
        out.update(moe_shared_expert_ffn_hidden_size=hf["shared_expert_intermediate_size"],
                   moe_shared_expert_gate=True)
    return out


def from_hf_config(hf: dict) -> HFModelInfo:
    """ModelConfig for a Hugging Face config.json dict; one-line errors for what is unsupported."""
    arch = _architecture(hf)
    if arch in CAUSAL_LM:
        model_type, is_reward = CAUSAL_LM[arch], False
    elif arch in REWARD:
        model_type, is_reward = REWARD[arch], True
        labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)
        if labels != 1:
            raise ConfigError(f"{arch} has num_labels={labels}: a reward model needs exactly 1 "
                              "(a scalar score)")
    else:
        raise ConfigError(f"architecture {arch} is not supported: use one of {', '.join(SUPPORTED)}")
    try:
        config = _gpt2(hf) if model_type == "gpt2" else _llama_like(hf, model_type)
    except KeyError as missing:
        raise ConfigError(f"config.json for {arch} lacks {missing}: it is not a complete "
                          "transformers config") from None
    return HFModelInfo(config=config, architecture=arch, model_type=model_type, is_reward=is_reward)


def causal_lm_architecture(c: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) that a freshly initialized policy of this shape exports as."""
    if c.family == "gpt2":
        return "GPT2LMHeadModel", "gpt2"
    if c.is_moe:
        if c.moe_shared_expert_ffn_hidden_size is not None:
            return "Qwen2MoeForCausalLM", "qwen2_moe"
        return ("Qwen3MoeForCausalLM", "qwen3_moe") if c.qk_norm else ("MixtralForCausalLM",
                                                                      "mixtral")
    if c.qk_norm:
        return "Qwen3ForCausalLM", "qwen3"
    return ("Qwen2ForCausalLM", "qwen2") if c.add_qkv_bias else ("LlamaForCausalLM", "llama")


def to_hf_config(info: HFModelInfo) -> dict:
    """A config.json dict that transformers builds ``info.architecture`` from."""
    c = info.config
    common = {"architectures": [info.architecture], "vocab_size": c.vocab_size,
              "tie_word_embeddings": c.tie_word_embeddings, "initializer_range": c.init_method_std}
    if info.is_reward:
        common.update(num_labels=1, id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0})
    if info.model_type == "gpt2":
        return {**common, "model_type": "gpt2", "n_layer": c.num_layers, "n_embd": c.hidden_size,
                "n_head": c.num_attention_heads, "n_inner": c.ffn_hidden_size,
                "n_positions": c.max_position_embeddings, "layer_norm_epsilon": c.norm_epsilon,
                "activation_function": "gelu_new" if c.activation == "gelu_tanh" else "gelu",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    out = {**common, "model_type": info.model_type, "num_hidden_layers": c.num_layers,
           "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_query_groups, "head_dim": c.kv_channels,
           "intermediate_size": c.ffn_hidden_size, "hidden_act": "silu",
           "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_epsilon,
           "rope_theta": c.rope_theta,
           "rope_parameters": hf_rope_parameters(c.rope_theta, c.rope_scaling)}
    if info.model_type in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if c.is_moe:
        out.update(num_experts_per_tok=c.moe_topk, router_aux_loss_coef=c.moe_aux_loss_coef)
        if info.model_type == "mixtral":  # its experts' size is intermediate_size
            out.update(num_local_experts=c.num_experts, intermediate_size=c.expert_ffn_hidden_size)
        else:
            out.update(num_experts=c.num_experts, moe_intermediate_size=c.expert_ffn_hidden_size,
                       norm_topk_prob=c.moe_renormalize, decoder_sparse_step=1,
                       mlp_only_layers=[])
        if c.moe_shared_expert_ffn_hidden_size is not None:
            out["shared_expert_intermediate_size"] = c.moe_shared_expert_ffn_hidden_size
    return out
