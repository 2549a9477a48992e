"""Rule rewards: a Python function ``module:function(prompts, responses) -> list[float]``."""

from __future__ import annotations

import importlib
import math

import torch

from ..config_io import ConfigError
from . import Reward, Scored


def load_rule(spec: str):
    """Import ``module:function``; one-line errors for every way it can be wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"reward.rule={spec!r} must look like module.path:function_name")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reward.rule: cannot import {module_name} ({err}): make it importable "
                          "(PYTHONPATH)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward.rule: {module_name} has no function {function_name}")
    return function


class RuleReward(Reward):
    def __init__(self, spec: str):
        self.spec = spec
        self.function = load_rule(spec)

    def score(self, items: list[Scored]) -> torch.Tensor:
        prompts = [i.prompt_text for i in items]
        responses = [i.response_text for i in items]
        values = list(self.function(prompts, responses))
        if len(values) != len(items):
            raise ConfigError(f"reward.rule {self.spec} returned {len(values)} rewards for "
                              f"{len(items)} responses: return one float per response")
        out = torch.tensor([float(v) for v in values], dtype=torch.float32)
        if not all(math.isfinite(v) for v in out.tolist()):
            raise ConfigError(f"reward.rule {self.spec} returned a non-finite reward")
        return out
