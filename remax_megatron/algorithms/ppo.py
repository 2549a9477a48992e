"""PPO as the ReMax paper's baseline: InstructGPT / DeepSpeed-Chat step 3 (ppo_trainer.py).

A critic V (a GPT with a scalar head, by default initialized from the reward model) values every
response position. Per-token reward: the KL penalty to the frozen reference plus the clipped score
on the last token,

    r_t = -kl_coef (log pi_old - log pi_ref)(y_t) + [t = T - 1] clip(r(x, y), -c, c)

advantages by GAE(gamma, lambda) against the old values, returns = advantages + values; the actor
minimizes the clipped surrogate (token mean), the critic 0.5 max((V - R)^2, (V_clip - R)^2).
Defaults follow DeepSpeed-Chat (kl_coef 0.1, score clip 5, gamma 1, lambda 0.95, clip 0.2 for both,
one epoch, no whitening; verl whitens: ``whiten_advantages``). Old log-probs and values are taken
before the first update.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import clipped_surrogate, gae, kl_penalty, last_token, reduce, symmetric_clip

GREEDY_BASELINE = False
CRITIC = True
MIN_SAMPLES = 1
DEFAULTS = {"kl_coef": 0.1, "clip_reward": 5.0, "gamma": 1.0, "lam": 0.95, "clip_ratio": 0.2,
            "clip_value": 0.2, "loss_reduction": "token_mean", "ppo_epochs": 1,
            "mini_batches": 1, "whiten_advantages": False}


def uses_reference(cfg) -> bool:
    return cfg.kl_coef > 0


def sequence_advantages(rewards: torch.Tensor, greedy: Optional[torch.Tensor], cfg) -> torch.Tensor:
    """Not an advantage yet: the terminal score, clipped (GAE makes the advantages)."""
    return symmetric_clip(rewards, cfg.clip_reward)


def token_rewards(score, mask, old_log_probs, ref_log_probs, cfg) -> torch.Tensor:
    """[N, L]: the KL penalty on every response token, plus the score on the last one."""
    rewards = last_token(mask).to(score.dtype) * score.unsqueeze(-1)
    if ref_log_probs is not None:
        rewards = rewards + kl_penalty(old_log_probs, ref_log_probs, cfg.kl_coef) * mask
    return rewards


def token_advantages(outcome, mask, old_log_probs, ref_log_probs, values, cfg):
    """(GAE advantages, returns) from the old policy's log-probs and the old values."""
    rewards = token_rewards(outcome, mask, old_log_probs, ref_log_probs, cfg)
    return gae(rewards, values, mask, cfg.gamma, cfg.lam)


def loss(log_probs, old_log_probs, adv, mask, ref_log_probs, cfg):
    per_token, clipped = clipped_surrogate(log_probs, old_log_probs, adv, cfg.clip_ratio, mask)
    loss_sum, normalizer = reduce(per_token, mask, cfg.loss_reduction)
    return loss_sum, normalizer, clipped
