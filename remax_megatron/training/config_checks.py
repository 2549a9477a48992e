"""The checks of a run's config before any model is built: one line per problem, saying what to
change. check_config is RL's; the shared parts (the policy's source, the ranges of the train,
parallel, checkpoint and log sections, the scale features) serve SFT and reward-model training
too (finetune_config.py)."""

from __future__ import annotations

from pathlib import Path

from ..config_io import ConfigError
from ..rollout.sampling import SamplingParams
from ..runtime.precision import check_precision
from ..seeds import MAX_SEED
from .config import PolicyConfig, RunConfig


def check_policy_source(p: PolicyConfig) -> None:
    if (p.load is None) == (p.model is None):
        raise ConfigError("set exactly one of policy.load (a checkpoint) or policy.model "
                          "(a fresh model config)")
    if p.load is not None and not Path(p.load).is_dir():
        raise ConfigError(f"policy.load={p.load} does not exist: convert your HF model with "
                          "remax-megatron convert hf-to-mcore first")
    if p.tokenizer is not None and not Path(p.tokenizer).is_dir():
        raise ConfigError(f"policy.tokenizer={p.tokenizer} is not a directory: point it at the "
                          "model's tokenizer files")


def check_config(cfg: RunConfig, world_size: int) -> None:
    """Everything that can be checked before building a model; one line per problem."""
    from ..runtime.layout import validate_layout

    p, t = cfg.policy, cfg.train
    check_policy_source(p)
    if (cfg.reward.rule is None) == (cfg.reward.load is None):
        raise ConfigError("set exactly one of reward.rule (module:function) or reward.load "
                          "(a reward-model checkpoint)")
    if cfg.reward.load is not None and not Path(cfg.reward.load).is_dir():
        raise ConfigError(f"reward.load={cfg.reward.load} does not exist: convert your HF reward "
                          "model with remax-megatron convert hf-to-mcore --model-type reward")
    if (cfg.data.path is None) == (not cfg.data.builtin):
        raise ConfigError("set exactly one of data.path (JSONL/parquet) or data.builtin: true")
    if cfg.data.path is not None and not Path(cfg.data.path).is_file():
        raise ConfigError(f"data.path={cfg.data.path} does not exist")
    if cfg.data.eval_path is not None and not Path(cfg.data.eval_path).is_file():
        raise ConfigError(f"data.eval_path={cfg.data.eval_path} does not exist")
    _check_ranges(cfg)
    check_scale_features(cfg)
    layout = validate_layout(world_size, cfg.parallel.tp, cfg.parallel.pp, p.model, "policy",
                             ep=cfg.parallel.ep)
    validate_layout(world_size, cfg.reward.tp, cfg.reward.pp, None, "reward model",
                    keys=("reward.tp", "reward.pp"))
    for name, value in (("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                        ("rollout.n_samples", cfg.rollout.n_samples),
                        ("data.max_prompt_length", cfg.data.max_prompt_length),
                        ("train.micro_batch_size", t.micro_batch_size)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    if t.global_batch_size // layout.dp < 1:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} gives dp rank no prompt")
    minis = cfg.algorithm.mini_batches or 1
    check_batch_split(t, layout.dp, cfg.rollout.n_samples, minis)
    check_virtual_pp(cfg, t.global_batch_size // layout.dp * cfg.rollout.n_samples
                     // (t.micro_batch_size * minis),
                     "lower train.micro_batch_size (or algorithm.mini_batches), or raise "
                     "train.global_batch_size")
    if cfg.rollout.pipeline_micro_batches < 0:
        raise ConfigError(f"rollout.pipeline_micro_batches={cfg.rollout.pipeline_micro_batches} "
                          "must be >= 0 (0: automatic)")
    if t.steps is not None and t.steps < 1:
        raise ConfigError(f"train.steps={t.steps} must be at least 1")
    if cfg.reward.micro_batch_size < 1:
        raise ConfigError(f"reward.micro_batch_size={cfg.reward.micro_batch_size} must be at least 1")
    r = cfg.rollout
    try:
        SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    except ConfigError as err:
        raise ConfigError(f"rollout: {err}") from None
    _check_algorithm(cfg)


def shared_ranges(cfg) -> list[tuple]:
    """(setting, value, ok, rule) for the sections every kind of training has (train, parallel,
    policy, checkpoint, log). NaN fails every comparison, so it is caught."""
    t, c, lg = cfg.train, cfg.checkpoint, cfg.log
    inf = float("inf")
    return [
        # a learning rate above 1 is a typo (1e30 would end in NaN weights, every update skipped)
        ("train.lr", t.lr, 0 <= t.lr <= 1, "a learning rate in [0, 1]"),
        ("train.min_lr", t.min_lr, 0 <= t.min_lr <= t.lr, f"in [0, train.lr={t.lr:g}]"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("train.weight_decay", t.weight_decay, 0 <= t.weight_decay < inf, ">= 0"),
        ("train.adam_beta1", t.adam_beta1, 0 <= t.adam_beta1 < 1, "in [0, 1)"),
        ("train.adam_beta2", t.adam_beta2, 0 <= t.adam_beta2 < 1, "in [0, 1)"),
        ("train.clip_grad", t.clip_grad, 0 <= t.clip_grad < inf, ">= 0 (0: no clipping)"),
        ("train.epochs", t.epochs, 0 < t.epochs < inf, "a positive number"),
        ("train.global_batch_size", t.global_batch_size, t.global_batch_size >= 1, ">= 1"),
        ("train.micro_batch_size", t.micro_batch_size, t.micro_batch_size >= 1, "at least 1"),
        ("train.seed", t.seed, 0 <= t.seed <= MAX_SEED, "in [0, 2**63 - 1]"),
        ("train.steps", t.steps, t.steps is None or t.steps >= 1, "at least 1"),
        ("parallel.timeout_minutes", cfg.parallel.timeout_minutes,
         0 < cfg.parallel.timeout_minutes <= 7 * 24 * 60, "in (0, 10080] (a week)"),
        ("train.max_skipped_steps", t.max_skipped_steps, t.max_skipped_steps >= 0,
         ">= 0 (0: never stop)"),
        ("checkpoint.save_every", c.save_every, c.save_every >= 0, ">= 0 (0: only at the end)"),
        ("checkpoint.keep_last", c.keep_last, c.keep_last >= 0, ">= 0 (0: keep every one)"),
        ("log.eval_every", lg.eval_every, lg.eval_every >= 0, ">= 0"),
        ("parallel.ep", cfg.parallel.ep, cfg.parallel.ep >= 1, ">= 1"),
        ("policy.moe_aux_loss_coef", cfg.policy.moe_aux_loss_coef,
         cfg.policy.moe_aux_loss_coef is None or 0 <= cfg.policy.moe_aux_loss_coef < 1e3,
         "in [0, 1000) (0: off; unset: the model's own)"),
    ]


def check_shared(cfg, rules: list[tuple]) -> None:
    """``rules`` (shared_ranges and the kind's own), then the settings every kind reads."""
    for name, value, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{name}={value!r} must be {rule}")
    if cfg.parallel.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"parallel.backend={cfg.parallel.backend!r}: use auto, nccl or gloo")
    if cfg.log.eval_every and cfg.data.eval_path is None:
        raise ConfigError(f"log.eval_every={cfg.log.eval_every} needs data.eval_path (held-out "
                          "data): set it, or remove log.eval_every")
    if cfg.train.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.dtype={cfg.train.dtype!r}: use auto, fp32, bf16 or fp16")
    check_precision(cfg.train.dtype, "train.dtype")


def _check_ranges(cfg: RunConfig) -> None:
    """The range of every number an RL run reads."""
    rules = shared_ranges(cfg) + [
        ("log.samples_every", cfg.log.samples_every, cfg.log.samples_every >= 0,
         ">= 0 (0: never)"),
        ("log.samples", cfg.log.samples, cfg.log.samples >= 1, ">= 1 (turn samples off with "
         "log.samples_every=0)"),
        ("rollout.top_k", cfg.rollout.top_k, cfg.rollout.top_k >= 0, ">= 0 (0: off)"),
        ("reward.tp", cfg.reward.tp, cfg.reward.tp >= 1, ">= 1"),
        ("reward.pp", cfg.reward.pp, cfg.reward.pp >= 1, ">= 1"),
    ]
    check_shared(cfg, rules)


def check_scale_features(cfg: RunConfig) -> None:
    """train.recompute and parallel.sequence_parallel."""
    from ..models.builder import RECOMPUTE

    if cfg.train.recompute not in RECOMPUTE:
        raise ConfigError(f"train.recompute={cfg.train.recompute!r}: use "
                          f"{', '.join(RECOMPUTE[:-1])} or {RECOMPUTE[-1]}")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp < 2:
        raise ConfigError(f"parallel.sequence_parallel=true needs parallel.tp >= 2 (it splits "
                          "the sequence over the tensor-parallel ranks), got "
                          f"tp={cfg.parallel.tp}: raise tp or turn it off")


def check_virtual_pp(cfg, per_update: int, fix: str) -> None:
    """parallel.virtual_pp: pp >= 2 and at least pp micro-batches in every update
    (``per_update``; ``fix`` says how to get more); megatron's interleaved schedule runs them in
    groups of pp. The layer split is checked with the policy's shape (policy.check_trainable)."""
    vpp, pp = cfg.parallel.virtual_pp, cfg.parallel.pp
    if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
        raise ConfigError(f"parallel.virtual_pp={vpp!r} must be a positive integer (1: off)")
    if vpp == 1:
        return
    if pp < 2:
        raise ConfigError(f"parallel.virtual_pp={vpp} needs pipeline parallelism: set "
                          f"parallel.pp >= 2, or parallel.virtual_pp=1")
    if per_update < pp:
        raise ConfigError(f"parallel.virtual_pp={vpp} needs at least pp={pp} micro-batches per "
                          f"update, got {per_update}: {fix}")


def check_batch_split(t, dp: int, n: int = 1, minis: int = 1) -> None:
    """Each dp rank trains on (global_batch_size / dp) x n sequences (RL: n samples per prompt),
    split into ``minis`` mini-batches (PPO/GRPO) of whole micro-batches."""
    if t.global_batch_size % dp:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"dp={dp}: make it a multiple of {dp}")
    sequences = t.global_batch_size // dp * n
    if sequences % (t.micro_batch_size * minis) == 0:
        return
    if n == 1 and minis == 1:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by dp x "
            f"micro_batch_size = {dp} x {t.micro_batch_size}: make it a multiple of "
            f"{dp * t.micro_batch_size}")
    raise ConfigError(
        f"each dp rank trains {t.global_batch_size} / dp {dp} x rollout.n_samples {n} = "
        f"{sequences} sequences, not divisible by train.micro_batch_size {t.micro_batch_size} x "
        f"algorithm.mini_batches {minis}: change one of them")


def _check_algorithm(cfg: RunConfig) -> None:
    alg, n = cfg.algorithm.module, cfg.rollout.n_samples
    if n < alg.MIN_SAMPLES:
        raise ConfigError(f"algorithm.name={cfg.algorithm.name} needs rollout.n_samples >= "
                          f"{alg.MIN_SAMPLES} (its baseline comes from the other samples), got {n}")
    c = cfg.critic
    if not alg.CRITIC and any(v is not None for v in (c.load, c.lr, c.min_lr)):
        raise ConfigError(f"critic.* is set but algorithm.name={cfg.algorithm.name} trains no "
                          "critic: remove it (only ppo has one)")
    for name in ("lr", "min_lr"):
        value = getattr(c, name)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"critic.{name}={value} must be a learning rate in [0, 1]")
    lr = cfg.train.lr if c.lr is None else c.lr
    min_lr = cfg.train.min_lr if c.min_lr is None else c.min_lr
    if alg.CRITIC and min_lr > lr:
        raise ConfigError(f"the critic's min_lr {min_lr:g} exceeds its lr {lr:g}: lower "
                          "critic.min_lr (or set critic.lr)")
    if c.load not in (None, "policy") and not Path(c.load).is_dir():
        raise ConfigError(f"critic.load={c.load} does not exist: give a reward-model checkpoint, "
                          "'policy', or leave it unset")
