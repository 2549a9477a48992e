"""The training run's config: dataclasses, loaded from YAML with ``key=value`` overrides, and
checked (unknown keys, impossible batch splits, missing files) before any model is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..algorithms import AlgorithmConfig
from ..config_io import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ..models.config import ModelConfig
from ..rollout.sampling import SamplingParams
from ..runtime.precision import check_precision
from ..seeds import MAX_SEED


@dataclass
class PolicyConfig:
    load: Optional[str] = None  # a remax-megatron checkpoint (convert an HF model first)
    model: Optional[ModelConfig] = None  # or a fresh randomly initialized model (the demo)
    tokenizer: Optional[str] = None  # default: the checkpoint's tokenizer/
    builtin_tokenizer: bool = False  # the demo's in-process tokenizer
    # a mixture-of-experts policy's load-balancing loss weight (megatron's switch loss, per MoE
    # layer); None: the model's own (its HF config's router_aux_loss_coef); 0: off
    moe_aux_loss_coef: Optional[float] = None


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # expert parallelism (a mixture-of-experts policy): its experts split over ep of the dp ranks,
    # which exchange tokens in every MoE layer (megatron's all-to-all); ep must divide dp
    ep: int = 1
    backend: str = "auto"
    # megatron's sequence parallelism (tp >= 2): norms, dropout and residuals work on 1/tp of the
    # sequence, the tensor-parallel all-reduces become reduce-scatter / all-gather pairs; the
    # rollout runs with it switched off
    sequence_parallel: bool = False
    # model chunks per pipeline stage (megatron's interleaved schedule, pp >= 2): the pipeline's
    # bubble shrinks by this factor, for virtual_pp times the stage-to-stage messages
    virtual_pp: int = 1
    # how long a rank waits in a collective for the others before the run stops with a line
    # naming the silent rank (torch's default; megatron's own groups get the same)
    timeout_minutes: float = 30.0


@dataclass
class RewardConfig:
    rule: Optional[str] = None  # "module:function(prompts, responses) -> list[float]"
    load: Optional[str] = None  # a reward-model checkpoint (converted HF sequence classifier)
    tokenizer: Optional[str] = None  # default: the reward checkpoint's tokenizer/
    tp: int = 1  # the reward model's own layout, independent of the policy's
    pp: int = 1
    micro_batch_size: int = 8


@dataclass
class DataConfig:
    path: Optional[str] = None  # JSONL / parquet rows {"prompt": ...} or {"messages": [...]}
    builtin: bool = False  # the demo's built-in prompts
    max_prompt_length: int = 256  # longer prompts are dropped (and counted)
    shuffle: bool = True
    eval_path: Optional[str] = None  # held-out prompts (same formats), scored with greedy decoding


@dataclass
class RolloutConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0  # the official code samples at 1.0 with top_p 0.9
    top_p: float = 0.9
    top_k: int = 0
    # sampled responses per prompt (RLOO and GRPO need >= 2); ReMax adds ONE greedy response per
    # prompt as the baseline of all n, every continuation sharing the prompt's single prefill
    n_samples: int = 1
    # pp > 1: prompt groups that follow each other through the pipeline stages during rollout;
    # 0 (auto): the prefill in 2 x pp groups, decode steps on the whole batch; N: N groups for
    # both (helps large, compute-bound batches); 1: the whole batch stage after stage
    pipeline_micro_batches: int = 0
    # on a GPU (pp 1, tp 1): each decode step replays one CUDA graph captured at the rollout's
    # first step instead of launching its few hundred kernels (same tokens up to float rounding)
    cuda_graph: bool = True
    # the log-probs the loss trains (and the reference's, and those the rollout records) are of
    # softmax(logits / temperature), the distribution the samples were drawn from (verl and TRL
    # do the same); false: of softmax(logits) whatever the temperature, so that at T != 1 the
    # samples come from another distribution than the one trained (see the README)
    tempered_log_probs: bool = True
    # a mixture-of-experts policy: its training forwards take the experts the rollout chose for
    # each token (Rollout Routing Replay) instead of routing again, where rounding may choose
    # others; off, moe/routing_mismatch counts the tokens routed differently
    routing_replay: bool = False


@dataclass
class CriticConfig:
    """The value model of algorithm.name=ppo (on the policy's tp/pp layout, own DDP/optimizer)."""

    # null: the reward model's checkpoint when reward.load is set (DeepSpeed-Chat), else the
    # policy's weights; "policy": the policy's weights (scalar head starting at 0); or a
    # reward-kind checkpoint (a converted sequence classifier, or a run's checkpoints/step_N/critic)
    load: Optional[str] = None
    lr: Optional[float] = None  # null: train.lr
    min_lr: Optional[float] = None  # null: train.min_lr


@dataclass
class TrainConfig:
    steps: Optional[int] = None  # default: epochs over the data
    epochs: float = 1.0
    global_batch_size: int = 8  # prompts per step, over all data-parallel ranks
    micro_batch_size: int = 4  # sequences per micro-batch
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    dtype: str = "auto"  # bf16 on GPU, fp32 on CPU
    seed: int = 1234
    # activation recompute in the policy's training forward/backward: none, selective (core
    # attention) or full (each layer recomputed from its input)
    recompute: str = "none"
    # steps in a row whose every update is skipped (non-finite loss or gradient) that stop the
    # run with an error; 0: never (fp16 runs never stop: their loss scaler skips while it
    # searches for its scale)
    max_skipped_steps: int = 5


@dataclass
class BaseLogConfig:
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    plot: bool = True
    eval_every: int = 0  # steps between evaluations on data.eval_path; 0: before and after only


@dataclass
class LogConfig(BaseLogConfig):
    samples_every: int = 10  # steps between sample printouts (and samples.jsonl rows); 0: never
    samples: int = 2  # prompts shown each time, with their greedy and sampled responses


@dataclass
class CheckpointConfig:
    save_every: int = 0  # steps; 0: only at the end
    keep_last: int = 2  # complete checkpoints kept (the newest); 0: keep every one
    export_hf: bool = False  # also write OUTPUT/hf, a Hugging Face directory, at the end


@dataclass
class RunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/remax"


def load_config(path: Optional[str], overrides: list[str], base: Optional[dict] = None) -> RunConfig:
    """``base`` (e.g. the demo) <- YAML file <- ``key=value`` overrides; unknown keys are errors."""
    data = _merge(base or {}, load_yaml(path) if path else {})
    apply_overrides(data, overrides)
    return from_dict(RunConfig, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section (its keys commented out) changes nothing
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


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
    _check_scale_features(cfg)
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
    _check_batch_split(cfg, layout.dp)
    _check_virtual_pp(cfg, layout.dp)
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
    if t.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.dtype={t.dtype!r}: use auto, fp32, bf16 or fp16")
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


def _check_scale_features(cfg: RunConfig) -> None:
    """train.recompute and parallel.sequence_parallel."""
    from ..models.builder import RECOMPUTE

    if cfg.train.recompute not in RECOMPUTE:
        raise ConfigError(f"train.recompute={cfg.train.recompute!r}: use "
                          f"{', '.join(RECOMPUTE[:-1])} or {RECOMPUTE[-1]}")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp < 2:
        raise ConfigError(f"parallel.sequence_parallel=true needs parallel.tp >= 2 (it splits "
                          "the sequence over the tensor-parallel ranks), got "
                          f"tp={cfg.parallel.tp}: raise tp or turn it off")


def _check_virtual_pp(cfg: RunConfig, dp: int) -> None:
    """parallel.virtual_pp: pp >= 2 and at least pp micro-batches in every update
    (megatron's interleaved schedule runs them in groups of pp). The layer split is checked
    with the policy's shape (Trainer._check_policy)."""
    vpp, pp = cfg.parallel.virtual_pp, cfg.parallel.pp
    if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
        raise ConfigError(f"parallel.virtual_pp={vpp!r} must be a positive integer (1: off)")
    if vpp == 1:
        return
    if pp < 2:
        raise ConfigError(f"parallel.virtual_pp={vpp} needs pipeline parallelism: set "
                          f"parallel.pp >= 2, or parallel.virtual_pp=1")
    t = cfg.train
    per_update = (t.global_batch_size // dp * cfg.rollout.n_samples
                  // (t.micro_batch_size * (cfg.algorithm.mini_batches or 1)))
    if per_update < pp:
        raise ConfigError(f"parallel.virtual_pp={vpp} needs at least pp={pp} micro-batches per "
                          f"update, got {per_update}: lower train.micro_batch_size (or "
                          "algorithm.mini_batches), or raise train.global_batch_size")


def _check_batch_split(cfg: RunConfig, dp: int) -> None:
    """Each dp rank trains on (prompts / dp) x n_samples sequences, split into mini-batches
    (PPO/GRPO) of whole micro-batches."""
    t, n = cfg.train, cfg.rollout.n_samples
    minis = cfg.algorithm.mini_batches or 1
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


def snapshot(cfg: RunConfig) -> dict:
    return to_dict(cfg)
