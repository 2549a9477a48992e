"""REINFORCE (Williams 1992) with no baseline: A = r(x, y). The variance reference of the ReMax
paper (its claim is ReMax's far lower gradient variance at equal reward). Per-token returns, the
optional KL term in the reward, discount and loss are ReMax's (remax.py); only the baseline is gone.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import remax
from .common import symmetric_clip

GREEDY_BASELINE = False
CRITIC = False
MIN_SAMPLES = 1
DEFAULTS = dict(remax.DEFAULTS)
uses_reference = remax.uses_reference
token_advantages = remax.token_advantages
loss = remax.loss


def sequence_advantages(rewards: torch.Tensor, greedy: Optional[torch.Tensor], cfg) -> torch.Tensor:
    """A = r for every sample, clipped when configured."""
    return symmetric_clip(rewards, cfg.clip_advantage)
