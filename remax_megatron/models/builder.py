"""Build megatron-core GPTModels (policy) and reward models from a ModelConfig.

The megatron plumbing for models lives here: TransformerConfig, the layer spec (local or
Transformer Engine), pipeline stage flags, vocab padding, and the reward model's scalar head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
import torch.nn.functional as F

from ..config_io import ConfigError
from .config import ModelConfig
from .rope import scaled_inv_freq

log = logging.getLogger(__name__)

SPECS = ("auto", "local", "te")
# activation recompute: none; selective (megatron's core attention: the [b, heads, s, s] scores and
# softmax are recomputed in the backward); full (every layer keeps only its input, the whole layer
# is recomputed in the backward, one layer per checkpoint)
RECOMPUTE = ("none", "selective", "full")


def transformer_engine_usable() -> bool:
    """Transformer Engine is used only when it imports and CUDA is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises more than ImportError when its CUDA libraries are missing
        return False
    return True


def resolve_spec(spec: str = "auto") -> str:
    if spec not in SPECS:
        raise ConfigError(f"layer spec {spec!r} is unknown: use one of {', '.join(SPECS)}")
    if spec == "auto":
        return "te" if transformer_engine_usable() else "local"
    if spec == "te" and not transformer_engine_usable():
        raise ConfigError("spec=te needs transformer-engine and a CUDA GPU: use spec=local")
    return spec


def _activation(model: ModelConfig):
    if model.activation == "swiglu":
        return F.silu, True
    if model.activation == "gelu_tanh":
        return functools.partial(F.gelu, approximate="tanh"), False
    return F.gelu, False


def _recompute_settings(recompute: str) -> dict:
    if recompute not in RECOMPUTE:
        raise ConfigError(f"recompute={recompute!r} is unknown: use one of {', '.join(RECOMPUTE)}")
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    return {}


def transformer_config(model: ModelConfig, tp: int = 1, pp: int = 1,
                       params_dtype: torch.dtype = torch.float32,
                       perform_initialization: bool = True, recompute: str = "none",
                       sequence_parallel: bool = False, virtual_pp: int = 1, ep: int = 1):
    """megatron-core TransformerConfig for ``model`` at this layout (``ep``: expert parallelism;
    megatron marks expert weights by it, so that DDP leaves their gradients to each expert-parallel
    rank instead of summing them over dp) and dtype, with activation
    ``recompute`` (see RECOMPUTE), megatron's sequence parallelism (tp > 1 only) and
    ``virtual_pp`` model chunks per pipeline stage (megatron's interleaved schedule)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if sequence_parallel and tp < 2:
        raise ConfigError(f"sequence_parallel needs tensor parallelism (tp >= 2), got tp={tp}")
    check_virtual_pp(model, pp, virtual_pp)
    activation, gated = _activation(model)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm" if model.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=model.norm_epsilon,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_norm,  # also makes megatron sum these norms' grads over tp
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # CPU initialization gives every layout the same full weights before sharding.
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        # Fusions need apex / CUDA kernels; the plain paths are exact everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        attention_softmax_in_fp32=True,
        deallocate_pipeline_outputs=True,
        sequence_parallel=sequence_parallel,
        virtual_pipeline_model_parallel_size=virtual_pp if virtual_pp > 1 else None,
        **_recompute_settings(recompute),
        **_moe_settings(model),
    )


def _moe_settings(model: ModelConfig) -> dict:
    """megatron's MoE layer as transformers' Mixtral / Qwen-MoE blocks compute it: the router
    in fp32 (transformers' softmax is fp32), no token dropping, the all-to-all dispatcher (token
    counts differ per rank: it exchanges them), sequential experts unless grouped GEMM is
    available, the load-balancing loss at ``moe_aux_loss_coef`` (overridable at build time)."""
    if not model.is_moe:
        return {}
    _define_te_gemm()
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_router_pre_softmax=not model.moe_renormalize,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.moe_aux_loss_coef,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_shared_expert_overlap=False,
    )


def _define_te_gemm() -> None:
    """megatron-core 0.16's router names ``te_general_gemm`` without Transformer Engine, where
    the import that defines it failed (NameError at the first forward): define it as absent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def check_virtual_pp(model: ModelConfig, pp: int, virtual_pp: int) -> None:
    """``virtual_pp`` chunks per pipeline stage: each of the pp * virtual_pp chunks holds
    num_layers / (pp * virtual_pp) layers."""
    if not isinstance(virtual_pp, int) or isinstance(virtual_pp, bool) or virtual_pp < 1:
        raise ConfigError(f"virtual_pp must be a positive integer, got {virtual_pp!r}")
    if virtual_pp > 1 and pp < 2:
        raise ConfigError(f"virtual_pp={virtual_pp} needs pipeline parallelism (pp >= 2), "
                          f"got pp={pp}: set pp >= 2 or virtual_pp=1")
    if model.num_layers % (pp * virtual_pp):
        raise ConfigError(f"{model.num_layers} layers do not split into pp*virtual_pp="
                          f"{pp}*{virtual_pp} chunks of equal size: choose virtual_pp so that "
                          f"pp*virtual_pp divides {model.num_layers}")


def layer_spec(model: ModelConfig, spec: str = "auto"):
    from megatron.core.models.gpt import gpt_layer_specs

    if resolve_spec(spec) == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.num_experts, qk_layernorm=model.qk_norm)
    normalization = "RMSNorm" if model.norm == "rmsnorm" else "LayerNorm"
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=model.num_experts, normalization=normalization, qk_layernorm=model.qk_norm)


class SequenceParallelTorchNorm:
    """torch's LayerNorm / RMSNorm for sequence parallelism (megatron's own WrappedTorchNorm,
    the local spec's norm without apex, refuses it). Under sequence parallelism each tp rank
    normalizes its own slice of the sequence, so a norm's weight gradient is a partial sum: the
    ``sequence_parallel`` mark makes megatron's finalize_model_grads all-reduce it over tp (what
    apex's FusedLayerNorm and Transformer Engine's norms do)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _block_spec(layers, cfg, pp_rank: int, vp_stage: int | None):
    """The layer spec as a whole transformer block; under sequence parallelism with torch's norms
    (the local spec without apex) every norm, the final one included, made sequence-parallel."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules, get_num_layers_to_build,
    )

    if not cfg.sequence_parallel or isinstance(layers, TransformerBlockSubmodules):
        return layers
    subs = layers.submodules
    if WrappedTorchNorm not in (subs.input_layernorm, subs.pre_mlp_layernorm):
        return layers  # apex's / Transformer Engine's norms support it themselves
    norms = {name: SequenceParallelTorchNorm for name in ("input_layernorm", "pre_mlp_layernorm")
             if getattr(subs, name) is WrappedTorchNorm}
    attn = subs.self_attention
    # q/k norms (Qwen3) see this rank's heads only: their grads are summed over tp either way
    qk = {name: SequenceParallelTorchNorm for name in ("q_layernorm", "k_layernorm")
          if getattr(attn.submodules, name, None) is WrappedTorchNorm}
    if qk:
        norms["self_attention"] = dataclasses.replace(
            attn, submodules=dataclasses.replace(attn.submodules, **qk))
    layer = dataclasses.replace(layers, submodules=dataclasses.replace(subs, **norms))
    count = get_num_layers_to_build(cfg, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * count,
                                      layer_norm=SequenceParallelTorchNorm)


def _stage_flags(pg_collection, vp_stage: int | None = None,
                 virtual_pp: int = 1) -> tuple[bool, bool]:
    """(pre_process, post_process): the first chunk of the first stage holds the embedding, the
    last chunk of the last stage the output layer."""
    rank, size = _pp_rank(pg_collection), _group_sizes(pg_collection)[1]
    chunk = vp_stage or 0
    return rank == 0 and chunk == 0, rank == size - 1 and chunk == virtual_pp - 1


def mark_tensor_parallel(model: torch.nn.Module) -> None:
    """Give every tensor-parallel weight megatron's partition attributes.

    megatron-core sets them while initializing weights, so a model built without initialization
    (to be loaded from a checkpoint) lacks them, and megatron then treats those weights as
    replicated (for example in the gradient-norm sum). Biases are marked by megatron either way.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or hasattr(weight, "tensor_model_parallel"):
            continue
        mode = getattr(module, "parallel_mode", None)  # Transformer Engine's linears
        # every SwiGLU fc1: the dense MLP's, each expert's and the shared expert's
        gated_fc1 = name.endswith("linear_fc1") and module.config.gated_linear_unit
        if isinstance(module, VocabParallelEmbedding):
            rule = (0, 1)
        elif isinstance(module, ColumnParallelLinear) or mode == "column":
            rule = (0, 2 if gated_fc1 else 1)  # SwiGLU fc1 = [gate; up], each sharded
        elif isinstance(module, RowParallelLinear) or mode == "row":
            rule = (1, 1)
        else:
            continue
        set_tensor_model_parallel_attributes(weight, True, *rule)


def _gpt_kwargs(model: ModelConfig, tp: int, pre: bool, post: bool) -> dict:
    return dict(
        vocab_size=model.padded_vocab_size(tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        position_embedding_type="rope" if model.position_embedding == "rope" else "learned_absolute",
        rotary_base=model.rope_theta,
    )


def build_policy(model: ModelConfig, params_dtype: torch.dtype = torch.float32, spec: str = "auto",
                 pg_collection=None, perform_initialization: bool = True,
                 recompute: str = "none", sequence_parallel: bool = False,
                 virtual_pp: int = 1, vp_stage: int | None = None):
    """A megatron-core GPTModel for this rank's pipeline stage (parallel_state or
    ``pg_collection``), with activation ``recompute`` (see RECOMPUTE) and sequence parallelism;
    with ``virtual_pp`` > 1, the stage's chunk ``vp_stage`` (see build_chunks)."""
    from megatron.core.models.gpt import GPTModel

    return _build(GPTModel, model, params_dtype, spec, pg_collection, perform_initialization,
                  recompute, sequence_parallel, virtual_pp, vp_stage,
                  tied=model.tie_word_embeddings)


def _build(cls, model: ModelConfig, params_dtype, spec, pg_collection, perform_initialization,
           recompute, sequence_parallel, virtual_pp, vp_stage, tied: bool):
    tp, pp = _group_sizes(pg_collection)
    if virtual_pp > 1 and vp_stage is None:
        raise ValueError("virtual_pp > 1 builds one chunk per call: pass vp_stage")
    vp_stage = vp_stage if virtual_pp > 1 else None
    pre, post = _stage_flags(pg_collection, vp_stage, virtual_pp)
    cfg = transformer_config(model, tp, pp, params_dtype, perform_initialization, recompute,
                             sequence_parallel, virtual_pp, _ep_size(pg_collection, model))
    gpt = cls(
        config=cfg,
        transformer_layer_spec=_block_spec(layer_spec(model, spec), cfg, _pp_rank(pg_collection),
                                           vp_stage),
        share_embeddings_and_output_weights=tied,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
        **_gpt_kwargs(model, tp, pre, post),
    )
    _finish(gpt, model)
    return gpt


def build_chunks(model: ModelConfig, virtual_pp: int = 1, reward: bool = False,
                 **options) -> list:
    """This rank's model chunks (a policy, or a reward model / critic with ``reward``) for
    megatron's interleaved pipeline schedule: with pp stages and ``virtual_pp`` chunks per stage,
    chunk v of stage r holds the (v * pp + r)-th slice of num_layers / (pp * virtual_pp) layers,
    so an activation crosses the stages virtual_pp times and the pipeline's bubble shrinks by
    that factor. One chunk (a list of the stage's model) when virtual_pp is 1."""
    if virtual_pp == 1:
        return [build_model(model, reward=reward, **options)]
    return [build_model(model, reward=reward, virtual_pp=virtual_pp, vp_stage=v, **options)
            for v in range(virtual_pp)]


def _pp_rank(pg_collection) -> int:
    if pg_collection is None:
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_rank()
    return pg_collection.pp.rank()


def _group_sizes(pg_collection) -> tuple[int, int]:
    if pg_collection is None:
        from megatron.core import parallel_state

        return (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
    return pg_collection.tp.size(), pg_collection.pp.size()


def _ep_size(pg_collection, model: ModelConfig) -> int:
    """The expert-parallel size of a mixture-of-experts model's groups (1 for a dense model)."""
    if not model.is_moe:
        return 1
    if pg_collection is None:
        from megatron.core import parallel_state

        return parallel_state.get_expert_model_parallel_world_size()
    group = getattr(pg_collection, "ep", None)
    return 1 if group is None else group.size()


def _reward_model_class():
    from megatron.core.models.gpt import GPTModel

    class RewardModel(GPTModel):
        """GPT backbone whose last stage ends in a scalar head: one score per position, [b, s]."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.post_process:
                # The vocab projection is not part of a reward model; a replicated scalar head is.
                del self.output_layer
                self.score_head = torch.nn.Linear(
                    self.config.hidden_size, 1, bias=False, dtype=self.config.params_dtype
                )
                if self.config.perform_initialization:
                    self.config.init_method(self.score_head.weight)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            # The language-model base class pads / ties an output_layer on the last stage;
            # a reward model has none (its score_head is a plain replicated parameter).
            post_process, self.post_process = self.post_process, False
            try:
                return super().sharded_state_dict(prefix, sharded_offsets, metadata)
            finally:
                self.post_process = post_process

        def _postprocess(self, hidden_states, *args, **kwargs):
            if not self.post_process:
                return hidden_states
            scores = self.score_head(hidden_states).squeeze(-1)  # [s, b]
            return scores.transpose(0, 1).contiguous()  # [b, s]

    return RewardModel


def build_reward_model(model: ModelConfig, params_dtype: torch.dtype = torch.float32,
                       spec: str = "auto", pg_collection=None,
                       perform_initialization: bool = True, recompute: str = "none",
                       sequence_parallel: bool = False, virtual_pp: int = 1,
                       vp_stage: int | None = None):
    """The reward model: the policy's backbone with a scalar head instead of the vocab projection
    (with ``virtual_pp`` > 1, chunk ``vp_stage`` of the stage: PPO's critic on the policy's
    layout)."""
    return _build(_reward_model_class(), model, params_dtype, spec, pg_collection,
                  perform_initialization, recompute, sequence_parallel, virtual_pp, vp_stage,
                  tied=False)


def _finish(gpt, model: ModelConfig) -> None:
    gpt.model_config = model
    mark_tensor_parallel(gpt)
    if model.rope_scaling is not None:
        # before any forward: megatron caches the rotary table per sequence length
        rotary = gpt.rotary_pos_emb
        rotary.inv_freq = scaled_inv_freq(rotary.inv_freq, model.rope_scaling)


def build_model(model: ModelConfig, reward: bool = False, **kwargs):
    return (build_reward_model if reward else build_policy)(model, **kwargs)


# the attributes megatron's layers read at forward time to work on sequence-parallel activations
# (megatron.core.transformer.utils.set_model_to_sequence_parallel flips the same ones)
SEQUENCE_PARALLEL_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel",
                            "reduce_scatter_embeddings")


@contextlib.contextmanager
def sequence_parallel_off(model: torch.nn.Module):
    """Run the block with megatron's sequence parallelism switched off in ``model`` (any wrapper
    of it): the rollout's KV-cached walk over megatron's modules (rollout/forward.py) works on full
    sequences of one token per row. Every module attribute that turns it on, and the config, are
    set to False and restored afterwards, exactly as they were. Nothing happens without it."""
    gpts = [unwrap(chunk) for chunk in model_chunks(model)]
    configs = {id(gpt.config): gpt.config for gpt in gpts}.values()
    if not any(config.sequence_parallel for config in configs):
        yield
        return
    saved = [(module, name, getattr(module, name)) for gpt in gpts for module in gpt.modules()
             for name in SEQUENCE_PARALLEL_ATTRS
             if isinstance(getattr(module, name, None), bool)]
    saved += [(config, "sequence_parallel", config.sequence_parallel) for config in configs]
    try:
        for module, name, _ in saved:
            setattr(module, name, False)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def sequence_multiple(model: torch.nn.Module) -> int:
    """What a training micro-batch's sequence length must be a multiple of: tp under sequence
    parallelism (megatron splits the sequence over the tensor-parallel ranks), else 1."""
    config = unwrap(model).config
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def unwrap(module) -> torch.nn.Module:
    """The GPTModel under megatron's DDP / Float16Module wrappers (of a chunk list: the first
    chunk's, which holds what every chunk shares: config, process groups, model_config)."""
    if isinstance(module, (list, tuple)):
        module = module[0]
    while hasattr(module, "module"):
        module = module.module
    return module


def model_chunks(model) -> list:
    """A model as the list of its virtual pipeline chunks (one chunk: ``[model]``)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def dtype_from_name(name: str) -> torch.dtype:
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in names:
        raise ConfigError(f"dtype {name!r} is unknown: use fp32, bf16 or fp16")
    return names[name]

