"""The math every on-policy algorithm shares, as pure tensor functions (no torch.distributed).

Shapes: ``mask`` [N, L] marks each row's response tokens (contiguous, anywhere in the row: the
trainer's rows hold the prompt first); per-token tensors are [N, L] in the same frame; per-sequence
tensors are [N]. Losses return ``(loss_sum, normalizer)``: the trainer divides the global sum by
the global normalizer, so a reduction is exact across micro-batches and data parallelism.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config_io import ConfigError

# sequence_sum: sum over a response's tokens, mean over responses (the ReMax paper's loss);
# token_mean: mean over all response tokens (DeepSpeed-Chat, the official ReMax code, verl);
# sequence_mean: mean over a response's tokens, then over responses (the GRPO paper).
REDUCTIONS = ("sequence_sum", "token_mean", "sequence_mean")


def symmetric_clip(values: torch.Tensor, limit: Optional[float]) -> torch.Tensor:
    """``values`` clipped to [-limit, limit]; unchanged when ``limit`` is None."""
    return values if limit is None else values.clamp(-limit, limit)


def discounted_returns(adv: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                       kl: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token returns of a trajectory-level advantage ``adv`` [N] (official ReMax code):
    return_t = kl_t + gamma^(T - t) * A for the T response tokens (t from 0), zero elsewhere.
    With gamma = 1 and no KL every response token's return is A."""
    mask = mask.to(adv.dtype)
    length = mask.sum(-1, keepdim=True)  # T per row
    t = mask.cumsum(-1) - 1  # index of each response token within its response
    discount = gamma ** (length - t) if gamma != 1.0 else torch.ones_like(mask)
    out = discount * adv.unsqueeze(-1)
    if kl is not None:
        out = out + kl
    return out * mask


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token KL reward kl_coef * (log pi_ref - log pi) (the estimator DeepSpeed-Chat and the
    official ReMax code add to the reward)."""
    return kl_coef * (ref_log_probs - log_probs)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref), per token (GRPO's KL loss term):
    exp(ref - lp) - (ref - lp) - 1 >= 0, unbiased, zero where the two agree (and off ``mask``:
    no exp of a prompt or padding position's gap, which could overflow into inf * 0 = NaN)."""
    diff = ref_log_probs - log_probs
    if mask is not None:
        diff = diff * mask.to(diff.dtype)
    return torch.exp(diff) - diff - 1


def reduce(per_token: torch.Tensor, mask: torch.Tensor,
           reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, normalizer) of a per-token loss over the response tokens."""
    mask = mask.to(per_token.dtype)
    if reduction == "sequence_sum":
        return (per_token * mask).sum(), torch.tensor(float(mask.size(0)), device=mask.device)
    if reduction == "token_mean":
        return (per_token * mask).sum(), mask.sum()
    if reduction == "sequence_mean":
        per_row = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_row.sum(), torch.tensor(float(mask.size(0)), device=mask.device)
    raise ConfigError(f"loss reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")


def policy_gradient_loss(log_probs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                         reduction: str = "sequence_sum") -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE: -weight_t * log pi(y_t), the weights (returns) held constant."""
    return reduce(-weights.detach() * log_probs, mask, reduction)


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                      adv: torch.Tensor, clip_ratio: float,
                      mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017) per token: -min(rho A, clip(rho, 1 - eps,
    1 + eps) A) with rho = pi / pi_old, and where the clipped term was the smaller (no gradient).
    Off ``mask`` the ratio is 1 (no exp of a gap that could overflow)."""
    log_ratio = log_probs - old_log_probs
    if mask is not None:
        log_ratio = log_ratio * mask.to(log_ratio.dtype)
    ratio = torch.exp(log_ratio)
    adv = adv.detach()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over each row's response tokens:

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},

    with V and A zero after the last token (the episode ends there). Returns (advantages,
    returns = advantages + values), zero outside the mask."""
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's loss per token (DeepSpeed-Chat / verl): 0.5 max((V - R)^2, (V_clip - R)^2),
    V_clip = V_old + clip(V - V_old, -eps, eps); and where the clipped term was the larger."""
    clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    loss_plain = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    return 0.5 * torch.maximum(loss_plain, loss_clipped), (loss_clipped > loss_plain).detach()


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """[N, L] one at each row's last response token (where a terminal reward goes)."""
    mask = mask.to(torch.float32)
    return mask * (mask.cumsum(-1) == mask.sum(-1, keepdim=True)).to(mask.dtype)


def whiten(values: torch.Tensor, mask: torch.Tensor, mean: float, std: float,
           eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / (std + eps) on the masked positions, zero elsewhere; the statistics are
    passed in so they can be global over data parallelism."""
    return (values - mean) / (std + eps) * mask.to(values.dtype)
