"""On-policy RLHF algorithms, one small module each, registered by name.

Every module says the same few things (see remax.py for the reference one):
  GREEDY_BASELINE   roll out one greedy continuation per prompt beside the n sampled ones
  CRITIC            train a value model beside the policy
  MIN_SAMPLES       the least rollout.n_samples it works with
  DEFAULTS          the algorithm.* options it reads, with their defaults
  uses_reference(cfg)                                  build the frozen reference policy?
  sequence_advantages(rewards [B, n], greedy [B] | None, cfg) -> [B, n]
  token_advantages(outcome [N], mask, old_lp, ref_lp, values, cfg) -> (adv [N, L], returns | None)
  loss(lp, old_lp, adv, mask, ref_lp, cfg) -> (loss_sum, normalizer, clipped-token mask)
The training loop (training/trainer.py) is the same for all of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ..config_io import ConfigError
from . import grpo, ppo, reinforce, remax, rloo
from .common import REDUCTIONS

ALGORITHMS = {"remax": remax, "ppo": ppo, "reinforce": reinforce, "rloo": rloo, "grpo": grpo}
NULLABLE = ("clip_advantage", "clip_reward")  # null: no clipping
MAX_COEF = 100.0  # a KL coefficient beyond this is a typo: rewards here are O(1)


class _Default:
    """Marks an option left to the chosen algorithm's default."""

    def __repr__(self) -> str:
        return "<the algorithm's default>"


DEFAULT = _Default()


def _option(help_text: str):
    return field(default=DEFAULT, metadata={"help": help_text})


@dataclass
class AlgorithmConfig:
    """``algorithm.*``: the name, and options that each default to the named algorithm's value
    (its module's DEFAULTS). Setting an option the algorithm does not read is an error."""

    name: str = "remax"
    kl_coef: Optional[float] = _option("per-token KL to the reference added to the reward")
    kl_loss_coef: Optional[float] = _option("GRPO: weight of the k3 KL loss term")
    clip_advantage: Optional[float] = _option("clip the sequence advantage to [-c, c]; null: none")
    clip_reward: Optional[float] = _option("PPO: clip the score to [-c, c]; null: none")
    gamma: Optional[float] = _option("discount")
    lam: Optional[float] = _option("PPO: GAE lambda")
    loss_reduction: Optional[str] = _option("sequence_sum | token_mean | sequence_mean")
    clip_ratio: Optional[float] = _option("PPO/GRPO: surrogate clip epsilon")
    clip_value: Optional[float] = _option("PPO: value clip epsilon")
    ppo_epochs: Optional[int] = _option("PPO/GRPO: passes over each rollout batch")
    mini_batches: Optional[int] = _option("PPO/GRPO: optimizer steps per pass")
    whiten_advantages: Optional[bool] = _option("PPO: normalize advantages over the batch")
    std_eps: Optional[float] = _option("GRPO: eps in (r - mean) / (std + eps)")

    def __post_init__(self):
        if self.name not in ALGORITHMS:
            raise ConfigError(f"algorithm.name={self.name!r} is unknown: use one of "
                              f"{', '.join(ALGORITHMS)}")
        defaults = ALGORITHMS[self.name].DEFAULTS
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            value = getattr(self, f.name)
            if f.name in defaults:
                setattr(self, f.name, defaults[f.name] if value is DEFAULT else value)
            elif value is DEFAULT or value is None:
                setattr(self, f.name, None)
            else:
                raise ConfigError(
                    f"algorithm.{f.name}={value!r} is not an option of algorithm.name="
                    f"{self.name}: its options are {', '.join(sorted(defaults))}")
        self._check()

    def _check(self) -> None:
        defaults = ALGORITHMS[self.name].DEFAULTS
        for name in defaults:
            if getattr(self, name) is None and name not in NULLABLE:
                raise ConfigError(f"algorithm.{name}=null: algorithm.name={self.name} needs a "
                                  f"value (its default is {defaults[name]!r})")

        def check(name: str, ok, rule: str) -> None:
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ConfigError(f"algorithm.{name}={value!r} must be {rule}")

        check("loss_reduction", lambda v: v in REDUCTIONS, f"one of {', '.join(REDUCTIONS)}")
        # finite and sane: an infinite or huge coefficient trains nothing but NaN
        for name in ("kl_coef", "kl_loss_coef"):
            check(name, lambda v: 0 <= v <= MAX_COEF, f"in [0, {MAX_COEF:g}]")
        check("gamma", lambda v: 0 < v <= 1, "in (0, 1]")
        check("lam", lambda v: 0 <= v <= 1, "in [0, 1]")
        for name in ("clip_advantage", "clip_reward"):
            check(name, lambda v: 0 < v < math.inf, "a finite number > 0, or null (no clip)")
        for name in ("clip_ratio", "clip_value", "std_eps"):
            check(name, lambda v: 0 < v < math.inf, "a finite number > 0")
        for name in ("ppo_epochs", "mini_batches"):
            check(name, lambda v: v >= 1, "at least 1")

    @property
    def module(self):
        return ALGORITHMS[self.name]

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per rollout batch (1: strictly on-policy, old log-probs = current)."""
        return (self.ppo_epochs or 1) * (self.mini_batches or 1)


def get(name: str):
    return ALGORITHMS[name]
