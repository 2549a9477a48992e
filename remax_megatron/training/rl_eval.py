"""RL's held-out evaluation: greedy responses to data.eval_path's prompts, scored by the run's
reward (rule or reward model), as the official ReMax code evaluates."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..data.loader import share_of
from ..models.builder import sequence_parallel_off
from ..rollout.engine import generate
from ..rollout.generate_command import left_pad
from ..rollout.sampling import GREEDY
from ..runtime.distributed import agreed
from .experience import RolloutShape, reward_items

EVAL_SHAPE = RolloutShape(1, False)  # one greedy response per held-out prompt


@torch.no_grad()
def greedy_evaluation(run) -> dict:
    """Greedy responses to the held-out prompts (data.eval_path), scored by the reward (the
    official ReMax code's evaluation). ``run``: the RL Trainer; every rank calls it."""
    from megatron.core import parallel_state as ps

    run.heartbeat.enter("evaluate", run.step)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # as many rows per call as a training rollout generates (prompts x continuations)
    per_call = max(1, run.cfg.train.global_batch_size // dp * run.shape.k)
    mine = share_of(list(enumerate(run.eval_prompts)), dp_rank, dp)
    # every rank makes the same number of reward calls (a reward model scores collectively)
    calls = -(-len(run.eval_prompts) // (dp * per_call))
    totals = torch.zeros(3, dtype=torch.float64)  # responses, reward sum, length sum
    for call in range(calls):
        chunk = mine[call * per_call:(call + 1) * per_call]
        items, lengths = [], torch.zeros(0)
        if chunk:
            ids, mask = left_pad([p.ids for _, p in chunk], run.pad)
            with sequence_parallel_off(run.ddp):
                out = generate(
                    run.ddp, ids, mask, continuations=[GREEDY],
                    max_new_tokens=run.cfg.rollout.max_new_tokens, eos_token_ids=run.eos,
                    vocab_size=run.trained.config.vocab_size, seed=0,
                    sample_ids=torch.tensor([i for i, _ in chunk]), pad_token_id=run.pad,
                    pipeline_micro_batches=run.cfg.rollout.pipeline_micro_batches,
                    cuda_graph=run.cfg.rollout.cuda_graph)
            items, lengths = reward_items(EVAL_SHAPE, chunk, out, run.tokenizer), out.lengths
        rewards = agreed(lambda: run.reward.score(items) if items or run.reward.collective
                          else torch.zeros(0))
        if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
            totals += torch.tensor([len(items), float(rewards.sum()),
                                    float(lengths.float().sum())], dtype=torch.float64)
    totals = totals.to(run.device)
    dist.all_reduce(totals)
    count, reward, length = totals.tolist()
    return {"eval/reward": reward / max(count, 1.0),
            "eval/response_length": length / max(count, 1.0), "eval/prompts": int(count)}

