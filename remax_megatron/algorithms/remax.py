"""ReMax (Li et al., ICML 2024) as pure tensor functions: no torch.distributed, no megatron.

For each prompt x: a sampled response y ~ pi(.|x) and the greedy response y*;
advantage A = r(x, y) - r(x, y*) (the greedy reward is the baseline), optionally clipped;
per-token return for the sampled response, token t of T (official code, remax_trainer.py):

    return_t = kl_t + gamma^(T - t) * A,    kl_t = kl_coef * (log pi_ref(y_t) - log pi(y_t))

(t counted from 0, so the last token gets gamma * A; with gamma = 1 and kl_coef = 0 every token's
return is A: the paper's trajectory-level REINFORCE). The loss is -return * log pi(y_t), reduced
as a sum over tokens and a mean over sequences (the paper, our default) or a mean over all tokens
(the official code). Functions return (loss_sum, normalizer): the trainer divides the global sum
by the global normalizer, so the reduction is exact across micro-batches and data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config_io import ConfigError

REDUCTIONS = ("sequence_sum", "token_mean")


@dataclass
class ReMaxConfig:
    kl_coef: float = 0.0  # > 0 adds a per-token KL-to-reference term to the reward (builds a reference)
    clip_advantage: Optional[float] = None  # the official code clips r(y) - r(y*) to [-5, 5]
    gamma: float = 1.0  # the official code's discount of the terminal reward (0.95 / 0.99 there)
    loss_reduction: str = "sequence_sum"  # paper: sum over tokens, mean over sequences

    def __post_init__(self):
        if self.loss_reduction not in REDUCTIONS:
            raise ConfigError(f"algorithm.loss_reduction={self.loss_reduction!r}: use one of "
                              f"{', '.join(REDUCTIONS)}")
        if self.kl_coef < 0:
            raise ConfigError(f"algorithm.kl_coef={self.kl_coef} must be >= 0")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"algorithm.gamma={self.gamma} must be in (0, 1]")
        if self.clip_advantage is not None and self.clip_advantage <= 0:
            raise ConfigError(f"algorithm.clip_advantage={self.clip_advantage} must be > 0 or null")


def advantage(reward_sampled: torch.Tensor, reward_greedy: torch.Tensor,
              clip: Optional[float] = None) -> torch.Tensor:
    """A = r(sampled) - r(greedy), one per prompt; clipped to [-clip, clip] when given."""
    adv = reward_sampled - reward_greedy
    return adv.clamp(-clip, clip) if clip is not None else adv


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token KL reward kl_coef * (log pi_ref - log pi) [N, T] (the official estimator)."""
    return kl_coef * (ref_log_probs - log_probs)


def returns(adv: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
            kl: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token returns [N, L] where ``mask`` [N, L] marks each row's T response tokens
    (contiguous, anywhere in the row): return_t = kl_t + gamma^(T - t) * A, zero elsewhere."""
    mask = mask.to(adv.dtype)
    length = mask.sum(-1, keepdim=True)  # T per row
    t = mask.cumsum(-1) - 1  # index of each response token within its response
    discount = gamma ** (length - t) if gamma != 1.0 else torch.ones_like(mask)
    out = discount * adv.unsqueeze(-1)
    if kl is not None:
        out = out + kl
    return out * mask


def policy_loss(log_probs: torch.Tensor, rets: torch.Tensor, mask: torch.Tensor,
                reduction: str = "sequence_sum") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, normalizer) of -return * log pi over response tokens.

    sequence_sum: normalizer = number of sequences; token_mean: number of response tokens.
    """
    mask = mask.to(log_probs.dtype)
    loss_sum = -(rets.detach() * log_probs * mask).sum()
    if reduction == "sequence_sum":
        normalizer = torch.tensor(float(mask.size(0)), device=mask.device)
    elif reduction == "token_mean":
        normalizer = mask.sum()
    else:
        raise ConfigError(f"loss reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")
    return loss_sum, normalizer
