"""One RL step's metrics row: its sums and timings gathered over the ranks
(gather_step_metrics), and the row from them (step_metrics: pure arithmetic)."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist

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


def gather_step_metrics(run, exp, policy: list, critic: list, times: tuple, lrs: dict) -> dict:
    """The RL step's sums reduced over every rank (each rank fills the part it owns: the
    rollout's on the first stage, the passes' on the last, tp rank 0 only) and its slowest
    rank's timings, as the metrics row. ``run``: the RL Trainer; ``exp``: the step's
    Experience; ``times``: start, rollout end, reward end, train end, critic seconds."""
    from megatron.core import parallel_state as ps

    from .critic import STATS as CRITIC_STATS

    sampled, greedy = exp.sampled, exp.greedy
    speaker = ps.get_tensor_model_parallel_rank() == 0
    rollout = torch.zeros(len(ROLLOUT_STATS), dtype=torch.float64)
    if speaker and ps.is_pipeline_first_stage():
        lengths = exp.out.lengths.float().cpu().view(-1, run.shape.k)
        first = int(run.shape.greedy)
        rollout = torch.tensor([
            sampled.size(0), sampled.numel(), sampled.sum(), (sampled ** 2).sum(),
            greedy.sum() if greedy is not None else 0.0, lengths[:, first:].sum(),
            lengths[:, 0].sum() if greedy is not None else 0.0, lengths.sum()],
            dtype=torch.float64)
    last = speaker and ps.is_pipeline_last_stage()
    critic_stats = (run.critic.stats if run.critic is not None
                    else torch.zeros(len(CRITIC_STATS), device=run.device))
    train = torch.cat([run._experience, run._update_stats.double(), critic_stats.double()])
    totals = torch.cat([rollout.to(run.device), train if last else torch.zeros_like(train)])
    dist.all_reduce(totals)
    start, t_rollout, t_reward, t_train, t_critic = times
    spans = torch.tensor([t_rollout - start, t_reward - t_rollout, t_critic,
                          t_train - t_reward - t_critic, t_train - start,
                          peak_memory_gib(run.device)],
                         dtype=torch.float64, device=run.device)
    dist.all_reduce(spans, op=dist.ReduceOp.MAX)
    s = dict(zip(ROLLOUT_STATS + EXPERIENCE_STATS + UPDATE_STATS + CRITIC_STATS,
                 totals.tolist()))
    return step_metrics(s, spans.tolist(), policy, critic if run.critic is not None else None,
                        lrs, step=run.step, epoch=run.loader.state.epoch,
                        greedy=run.shape.greedy,
                        clipped=run.cfg.algorithm.clip_ratio is not None)
