"""The configs of `remax-megatron sft` and `remax-megatron train-rm`: the policy, parallel, train,
log and checkpoint sections of an RL run (the same meaning, the same checks) and a data section of
their own; checked before any model is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config_io import ConfigError, apply_overrides, from_dict, load_yaml
from .config import BaseLogConfig, CheckpointConfig, ParallelConfig, PolicyConfig, TrainConfig
from .config_checks import (
    check_batch_split, check_policy_source, check_scale_features, check_shared,
    check_virtual_pp, shared_ranges,
)


@dataclass
class FinetuneDataConfig:
    path: Optional[str] = None  # JSONL / parquet (sft: prompt/response or messages; rm: pairs)
    eval_path: Optional[str] = None  # held-out rows, same format: loss (and accuracy) on them
    # tokens per row (prompt + response); longer rows are dropped (and counted); null: the model's
    # positions (max_position_embeddings)
    max_length: Optional[int] = None
    shuffle: bool = True


@dataclass
class SFTTrainConfig(TrainConfig):
    lr: float = 1e-5  # rows per step: global_batch_size; the loss: a mean over response tokens
    global_batch_size: int = 32
    micro_batch_size: int = 4


@dataclass
class RMTrainConfig(TrainConfig):
    lr: float = 5e-6  # DeepSpeed-Chat's reward-model scripts train at 5e-6 .. 9.65e-6
    global_batch_size: int = 32  # pairs per step
    micro_batch_size: int = 4  # pairs per micro-batch (both sides in it)


@dataclass
class SFTConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    log: BaseLogConfig = field(default_factory=BaseLogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/sft"


@dataclass
class RMConfig(SFTConfig):
    """policy.load: the model the reward model starts from: a policy checkpoint (its backbone,
    DeepSpeed-Chat's choice: the SFT model; the scalar head starts at 0) or a reward-model
    checkpoint (trained further)."""

    train: RMTrainConfig = field(default_factory=RMTrainConfig)
    output_dir: str = "runs/reward-model"


def load_finetune_config(kind, path: Optional[str], overrides: list[str]):
    """``kind``: SFTConfig or RMConfig; YAML file <- ``key=value`` overrides."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides)
    return from_dict(kind, data)


def check_finetune_config(cfg, world_size: int) -> None:
    """Everything that can be checked before building a model; one line per problem."""
    from ..runtime.layout import validate_layout

    check_policy_source(cfg.policy)
    d, t = cfg.data, cfg.train
    if d.path is None:
        raise ConfigError("set data.path (a JSONL or parquet file of training rows)")
    for name, value in (("data.path", d.path), ("data.eval_path", d.eval_path)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name}={value} does not exist")
    check_shared(cfg, shared_ranges(cfg) + [
        ("data.max_length", d.max_length, d.max_length is None or d.max_length >= 2,
         ">= 2 (tokens of a row)")])
    check_scale_features(cfg)
    if isinstance(cfg, RMConfig) and cfg.parallel.sequence_parallel:
        raise ConfigError("train-rm does not use sequence parallelism (its scalar head reads "
                          "whole sequences): set parallel.sequence_parallel=false")
    layout = validate_layout(world_size, cfg.parallel.tp, cfg.parallel.pp, cfg.policy.model,
                             "policy", ep=cfg.parallel.ep)
    check_batch_split(t, layout.dp)
    check_virtual_pp(cfg, t.global_batch_size // layout.dp // t.micro_batch_size,
                     "lower train.micro_batch_size or raise train.global_batch_size")
