"""RLOO, REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"):
n >= 2 samples per prompt, each one's baseline the mean reward of the OTHER n - 1 samples:

    A_i = r_i - (sum_j r_j - r_i) / (n - 1)  =  n / (n - 1) * (r_i - mean_j r_j)

Returns, KL term, discount and loss as in remax.py (the REINFORCE family).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import remax
from .common import symmetric_clip

GREEDY_BASELINE = False
CRITIC = False
MIN_SAMPLES = 2
DEFAULTS = dict(remax.DEFAULTS)
uses_reference = remax.uses_reference
token_advantages = remax.token_advantages
loss = remax.loss


def sequence_advantages(rewards: torch.Tensor, greedy: Optional[torch.Tensor], cfg) -> torch.Tensor:
    """[B, n] rewards -> leave-one-out advantages [B, n], clipped when configured."""
    n = rewards.size(-1)
    others = (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
    adv = rewards - others
    return symmetric_clip(adv, cfg.clip_advantage)
