"""The model a run trains, for every kind of training: what it is (a checkpoint, policy.load, or a
fresh model, policy.model), the checks it must pass before anything is built, its tokenizer, and
its chunks on this rank (plus a frozen copy as a reference) at the run's layout and precision."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_io import ConfigError
from ..data.tokenizer import check_fits, load_tokenizer
from ..models.builder import build_chunks, model_chunks, unwrap
from ..models.checkpoint import CheckpointMeta, load_model, read_checkpoint
from ..models.hf_config import HFModelInfo, causal_lm_architecture, to_hf_config
from ..models.sharding import load_full_state_dict, seeded_full_weights
from . import demo
from .config import RunConfig


@dataclass
class Policy:
    """What the loop needs to know about the policy beyond the modules."""

    config: object  # ModelConfig
    meta: CheckpointMeta
    hf_config: dict


def describe_policy(cfg: RunConfig) -> Policy:
    p = cfg.policy
    if p.load is not None:
        ckpt = read_checkpoint(p.load)
        if ckpt.meta.is_reward:
            raise ConfigError(f"policy.load={p.load} is a reward model; the policy must be "
                              "a causal LM checkpoint")
        hf = ckpt.hf_config or to_hf_config(HFModelInfo(
            ckpt.config, ckpt.meta.architecture, ckpt.meta.model_type, False))
        return Policy(ckpt.config, ckpt.meta, hf)
    arch, model_type = causal_lm_architecture(p.model)
    info = HFModelInfo(p.model, arch, model_type, False)
    meta = CheckpointMeta(kind="policy", architecture=arch, model_type=model_type,
                          dtype="fp32", vocab_size=p.model.vocab_size, source="random init")
    return Policy(p.model, meta, to_hf_config(info))


def policy_tokenizer(cfg: RunConfig):
    p = cfg.policy
    if p.builtin_tokenizer:
        return demo.tokenizer()
    if p.load is None and p.tokenizer is None:
        raise ConfigError("policy.model needs policy.tokenizer (a tokenizer directory) or "
                          "policy.builtin_tokenizer: true")
    if p.load is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(p.tokenizer)
    return load_tokenizer(read_checkpoint(p.load), p.tokenizer)


def check_trainable(cfg, model, tokenizer, positions: int, limit: str) -> None:
    """One-line errors for a model no kind of training can train at this layout;
    ``positions``: the longest row the run trains on, ``limit`` the settings that make it."""
    check_fits(tokenizer, model.vocab_size,
               cfg.policy.tokenizer or cfg.policy.load or "the built-in tokenizer")
    if positions > model.max_position_embeddings:
        raise ConfigError(f"{limit} exceeds the policy's {model.max_position_embeddings} "
                          f"positions: lower {'one' if ' + ' in limit else 'it'}")
    layers, split = model.num_layers, cfg.parallel.pp * cfg.parallel.virtual_pp
    if cfg.parallel.virtual_pp > 1 and layers % split:
        raise ConfigError(
            f"the policy's {layers} layers do not split into parallel.pp x virtual_pp = "
            f"{split} chunks of equal size: choose virtual_pp so that pp x virtual_pp "
            f"divides {layers}")
    if model.is_moe and cfg.parallel.tp > 1 and not cfg.parallel.sequence_parallel:
        raise ConfigError(  # megatron's MoE layer refuses to train so
            f"a mixture-of-experts policy at parallel.tp={cfg.parallel.tp} trains only with "
            "sequence parallelism: set parallel.sequence_parallel=true")


def check_policy(cfg: RunConfig, model, tokenizer, positions: int) -> None:
    """One-line errors for a policy this RL run cannot train; ``positions``: the longest row
    the run trains on (prompt and response)."""
    check_trainable(cfg, model, tokenizer, positions,
                    f"data.max_prompt_length {cfg.data.max_prompt_length} + "
                    f"rollout.max_new_tokens {cfg.rollout.max_new_tokens}")
    if model.hidden_dropout or model.attention_dropout:
        raise ConfigError(
            f"policy dropout (hidden_dropout={model.hidden_dropout}, attention_dropout="
            f"{model.attention_dropout}) must be 0: the update needs the log-probs of the "
            "responses exactly as the rollout produced them")
    if cfg.rollout.routing_replay and not model.is_moe:
        raise ConfigError("rollout.routing_replay needs a mixture-of-experts policy (it "
                          "replays the rollout's expert choices): turn it off")
    if cfg.rollout.routing_replay and cfg.train.recompute == "full" and cfg.parallel.pp > 1:
        raise ConfigError(  # a recomputed layer would route with a later micro-batch's choice
            "rollout.routing_replay with train.recompute=full needs parallel.pp=1: use "
            "recompute=selective, or pp=1")


def build_policy(cfg: RunConfig, precision) -> list:
    """The policy's chunks on this rank (one without virtual pipeline stages), through
    ``precision`` (dtype and device)."""
    p, vpp = cfg.policy, cfg.parallel.virtual_pp
    # megatron's scale features (the frozen reference, forward-only, needs neither)
    scale = dict(recompute=cfg.train.recompute, sequence_parallel=cfg.parallel.sequence_parallel)
    if p.load is not None:
        chunks = model_chunks(load_model(p.load, virtual_pp=vpp, **scale)[0])
    else:
        # A fresh model starts from the same weights at every layout (seeded_full_weights).
        chunks = build_chunks(p.model, vpp, perform_initialization=False, **scale)
        for chunk in chunks:
            load_full_state_dict(chunk, seeded_full_weights(chunk, cfg.train.seed))
    if p.moe_aux_loss_coef is not None:  # the routers read it at every training forward
        for chunk in chunks:
            unwrap(chunk).config.moe_aux_loss_coeff = p.moe_aux_loss_coef
    return [precision(chunk) for chunk in chunks]


def build_reference(cfg: RunConfig, policy_chunks: list, precision) -> list:
    """A frozen copy of the initial policy, chunked as it is."""
    p, vpp = cfg.policy, cfg.parallel.virtual_pp
    if p.load is not None:
        chunks = model_chunks(load_model(p.load, virtual_pp=vpp)[0])
    else:
        chunks = build_chunks(p.model, vpp, perform_initialization=False)
        for ref, chunk in zip(chunks, policy_chunks):
            ref.load_state_dict(unwrap(chunk).state_dict())
    for param in (param for ref in chunks for param in ref.parameters()):
        param.requires_grad_(False)
    return [precision(ref).eval() for ref in chunks]
