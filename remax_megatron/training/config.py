"""The training run's config: dataclasses, loaded from YAML with ``key=value`` overrides
(unknown keys are errors); config_checks.py checks it before any model is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..algorithms import AlgorithmConfig
from ..config_io import apply_overrides, from_dict, load_yaml, to_dict
from ..models.config import ModelConfig


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


def snapshot(cfg: RunConfig) -> dict:
    return to_dict(cfg)
