"""GRPO (Shao et al. 2024, DeepSeekMath, outcome supervision): n >= 2 samples per prompt,

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)      on every token of response i
    loss = PPO's clipped surrogate(A) + kl_loss_coef * k3(pi, pi_ref)   per token

std is the unbiased sample std of the prompt's n rewards (as verl and TRL compute it); the KL to
the reference is a loss term (k3 estimator), not part of the reward. The default reduction is the
paper's: mean over each response's tokens, then over responses. ``ppo_epochs`` x
``mini_batches`` updates per rollout; with one of each the ratio is exactly 1.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import clipped_surrogate, k3_kl, reduce

GREEDY_BASELINE = False
CRITIC = False
MIN_SAMPLES = 2
DEFAULTS = {"clip_ratio": 0.2, "kl_loss_coef": 0.04, "std_eps": 1e-6,
            "loss_reduction": "sequence_mean", "ppo_epochs": 1, "mini_batches": 1}


def uses_reference(cfg) -> bool:
    return cfg.kl_loss_coef > 0


def sequence_advantages(rewards: torch.Tensor, greedy: Optional[torch.Tensor], cfg) -> torch.Tensor:
    """[B, n] rewards -> group-normalized advantages [B, n]."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)  # unbiased (n - 1)
    return (rewards - mean) / (std + cfg.std_eps)


def token_advantages(outcome, mask, old_log_probs, ref_log_probs, values, cfg):
    """The sequence's advantage on each of its tokens."""
    return outcome.unsqueeze(-1) * mask.to(outcome.dtype), None


def loss(log_probs, old_log_probs, adv, mask, ref_log_probs, cfg):
    per_token, clipped = clipped_surrogate(log_probs, old_log_probs, adv, cfg.clip_ratio, mask)
    if ref_log_probs is not None:
        per_token = per_token + cfg.kl_loss_coef * k3_kl(log_probs, ref_log_probs, mask)
    loss_sum, normalizer = reduce(per_token, mask, cfg.loss_reduction)
    return loss_sum, normalizer, clipped
