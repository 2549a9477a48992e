"""ReMax (Li et al., ICML 2024, arXiv 2310.10505): REINFORCE with the greedy response's reward
as the baseline. No critic, no importance ratio, one update per rollout.

For each prompt x: n sampled responses y_i ~ pi(.|x) and ONE greedy response y* (never trained on),
all continuing the prompt's single prefill;

    A_i = r(x, y_i) - r(x, y*)                        optionally clipped to [-c, c] (official: 5)
    return_t = kl_t + gamma^(T - t) * A_i,  kl_t = kl_coef * (log pi_ref - log pi)(y_t)
    loss = -sum_t return_t * log pi(y_t)              (reductions: common.REDUCTIONS)

With gamma = 1 and kl_coef = 0 (the defaults) this is the paper's Algorithm 1; gamma, the KL term
in the reward, the clip and the token mean are the official code's (liziniu/ReMax,
remax_trainer.py) variants.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import discounted_returns, kl_penalty, policy_gradient_loss, symmetric_clip

GREEDY_BASELINE = True  # one greedy continuation per prompt beside the sampled ones
CRITIC = False
MIN_SAMPLES = 1
DEFAULTS = {"kl_coef": 0.0, "clip_advantage": None, "gamma": 1.0, "loss_reduction": "sequence_sum"}


def uses_reference(cfg) -> bool:
    return cfg.kl_coef > 0


def sequence_advantages(rewards: torch.Tensor, greedy: Optional[torch.Tensor], cfg) -> torch.Tensor:
    """[B, n] sampled rewards, [B] greedy rewards -> A = r - r(greedy), clipped when configured."""
    adv = rewards - greedy.unsqueeze(-1)
    return symmetric_clip(adv, cfg.clip_advantage)


def token_advantages(outcome, mask, old_log_probs, ref_log_probs, values, cfg):
    """The REINFORCE family's per-token returns (no critic: ``values`` is unused)."""
    kl = (kl_penalty(old_log_probs, ref_log_probs, cfg.kl_coef)
          if ref_log_probs is not None else None)
    return discounted_returns(outcome, mask, cfg.gamma, kl), None


def loss(log_probs, old_log_probs, adv, mask, ref_log_probs, cfg):
    """(loss_sum, normalizer, clipped-token mask): -return * log pi, nothing clipped."""
    loss_sum, normalizer = policy_gradient_loss(log_probs, adv, mask, cfg.loss_reduction)
    return loss_sum, normalizer, torch.zeros_like(mask, dtype=torch.bool)
