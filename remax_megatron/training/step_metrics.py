"""One RL step's metrics row from its sums (reduced over every rank) and timings: pure
arithmetic, no collectives."""

from __future__ import annotations

import resource

import torch

# per-step sums reduced over all ranks; each rank fills the part it owns
ROLLOUT_STATS = ("prompts", "n", "reward_sampled", "reward_sampled_sq", "reward_greedy",
                 "len_sampled", "len_greedy", "generated_tokens")
# once per step, where a batch's advantages are made (from the rollout weights' log-probs)
EXPERIENCE_STATS = ("tokens", "kl", "logprob_mismatch", "adv", "adv_sq")
# every policy update pass
UPDATE_STATS = ("pass_tokens", "entropy", "loss", "normalizer", "clipped")


def step_metrics(s: dict, spans: list[float], policy: list, critic: list | None, lrs: dict,
                 step: int, epoch: int, greedy: bool, clipped: bool) -> dict:
    """``s``: the step's sums by name; ``spans``: rollout, reward, critic, train and step seconds
    and the peak memory (GiB); ``policy`` / ``critic``: each update's (applied, grad norm)
    (``critic`` None without one); ``lrs``: the LRs the step trained with."""
    n, tokens = max(s["n"], 1.0), max(s["tokens"], 1.0)
    prompts, passes = max(s["prompts"], 1.0), max(s["pass_tokens"], 1.0)
    adv_mean, reward_mean = s["adv"] / tokens, s["reward_sampled"] / n
    t_roll, t_rew, t_crit, t_tr, t_step, peak = spans
    metrics = {
        "step": step,
        "reward/sampled": reward_mean,
        "reward/std": _std(s["reward_sampled_sq"] / n, reward_mean),
    }
    if greedy:
        metrics["reward/greedy"] = s["reward_greedy"] / prompts
    metrics.update({
        "advantage/mean": adv_mean,
        "advantage/std": _std(s["adv_sq"] / tokens, adv_mean),
        "kl": s["kl"] / tokens,
        "response_length/sampled": s["len_sampled"] / n,
    })
    if greedy:
        metrics["response_length/greedy"] = s["len_greedy"] / prompts
    metrics.update({
        "entropy": s["entropy"] / passes,
        "logprob_mismatch": s["logprob_mismatch"] / tokens,
        "loss": s["loss"] / max(s["normalizer"], 1.0),
        "grad_norm": mean_norm(policy),
        "lr": lrs["lr"],
        "skipped": sum(not applied for applied, _ in policy),
    })
    if clipped:
        metrics["clip_fraction"] = s["clipped"] / passes
    if critic is not None:
        metrics.update({
            "critic/value_loss": s["value_loss"] / max(s["value_normalizer"], 1.0),
            "critic/clip_fraction": s["value_clipped"] / max(s["value_tokens"], 1.0),
            "critic/grad_norm": mean_norm(critic),
            "critic/lr": lrs["critic/lr"],
            "critic/skipped": sum(not applied for applied, _ in critic),
        })
    metrics.update({
        "time/rollout": t_roll, "time/reward": t_rew, "time/critic": t_crit,
        "time/train": t_tr, "time/step": t_step,
        "tokens_per_second": (s["generated_tokens"] + s["tokens"]) / max(t_step, 1e-9),
        "rollout_tokens_per_second": s["generated_tokens"] / max(t_roll, 1e-9),
        "memory/peak_gib": peak,
        "epoch": epoch,
    })
    return metrics


def _std(mean_sq: float, mean: float) -> float:
    return max(mean_sq - mean ** 2, 0.0) ** 0.5


def mean_norm(updates: list[tuple[bool, float]]) -> float:
    """The mean gradient norm of the applied updates (NaN when none was)."""
    norms = [norm for applied, norm in updates if applied]
    return sum(norms) / len(norms) if norms else float("nan")


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
