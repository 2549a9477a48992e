"""From one rank's rollout to what the update trains on: the items a reward scores, and the
trained responses as right-padded [prompt; response] rows in micro-batches.

A rollout has k = (1 if greedy baseline) + n continuations per prompt, rows prompt-major: row r
continues prompt r // k, and its continuation index r % k is 0 for the greedy row (ReMax) and the
sampled ones after it. Only sampled rows are trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.padding import right_pad
from ..reward import Scored
from ..rollout.routes import batch_routes
from ..rollout.sampling import GREEDY, SamplingParams


@dataclass(frozen=True)
class RolloutShape:
    n_samples: int  # sampled continuations per prompt
    greedy: bool  # plus one greedy continuation first (ReMax's baseline)

    @property
    def k(self) -> int:
        return self.n_samples + int(self.greedy)

    def continuations(self, sampling: SamplingParams) -> list[SamplingParams]:
        return [GREEDY] * int(self.greedy) + [sampling] * self.n_samples

    def sampled_rows(self, prompts: int) -> list[int]:
        """Rollout rows trained on, prompt-major (prompt p's samples are contiguous)."""
        first = int(self.greedy)
        return [p * self.k + c for p in range(prompts) for c in range(first, self.k)]


def reward_items(shape: RolloutShape, mine, out, tokenizer) -> list[Scored]:
    """One item per rollout row; its uid (sample id x k + continuation) is unique world-wide."""
    items = []
    tokens, lengths = out.tokens.tolist(), out.lengths.tolist()  # one copy from the GPU
    for row in range(len(tokens)):
        uid, prompt = mine[row // shape.k]
        response = tokens[row][:lengths[row]]
        items.append(Scored(
            uid=shape.k * uid + row % shape.k, prompt_text=prompt.text,
            response_text=tokenizer.decode(response, skip_special_tokens=True),
            prompt_ids=list(prompt.ids), response_ids=response,
            ended_with_eos=out.finish_reason[row] == "eos"))
    return items


def split_rewards(shape: RolloutShape, rewards: torch.Tensor):
    """[B * k] rewards in row order -> (sampled [B, n], greedy [B] or None)."""
    table = rewards.view(-1, shape.k)
    if shape.greedy:
        return table[:, 1:], table[:, 0]
    return table, None


def micro_batches(shape: RolloutShape, mine, out, outcome: torch.Tensor, pad_id: int,
                  micro_batch_size: int, device, groups: int = 1,
                  by_length: bool = True, width_multiple: int = 1,
                  routes=None) -> tuple[list[dict], int]:
    """The sampled responses as right-padded [prompt; response] rows split into micro-batches.

    Per row: ``loss_mask`` marks the response tokens in the next-token-prediction frame (position
    t predicts token t + 1, so the frame is one shorter than the row), ``rollout_log_probs`` the
    log-probs the rollout saw there, ``outcome`` [B * n] the algorithm's per-sequence value
    (ReMax/RLOO/GRPO: the advantage; PPO: the terminal score), ``rows`` its index among the
    trained responses, and ``logit_positions`` [tokens, 2] the (row, position) pairs of the
    frame whose log-probs the loss reads (the output layer runs only there).

    ``by_length``: within each of ``groups`` contiguous groups of rows (the mini-batches, whose
    membership must not change), rows are ordered by length, so each micro-batch holds rows of
    similar length and is only as wide as its longest row (rounded up to ``width_multiple``);
    the loss is a global sum over rows, so only the summation order changes. Otherwise rows stay
    in rollout order, every micro-batch as wide as the longest row of all. ``routes`` (a
    mixture-of-experts rollout's RolloutRoutes) adds each micro-batch's recorded experts,
    ``routes`` {layer: [width, rows, k]}. Returns the micro-batches and the widest one's width.
    """
    rows = shape.sampled_rows(len(mine))
    tokens, lengths, log_probs = out.tokens.tolist(), out.lengths.tolist(), out.log_probs.cpu()
    prompts = [mine[r // shape.k][1].ids for r in rows]
    seqs = [list(p) + tokens[r][:lengths[r]] for p, r in zip(prompts, rows)]
    outcome = outcome.reshape(-1).float()
    order = list(range(len(seqs)))
    if by_length:
        per = len(order) // groups
        order = [i for g in range(groups)
                 for i in sorted(order[g * per:(g + 1) * per], key=lambda i: -len(seqs[i]))]
    longest = max(len(s) for s in seqs)
    batches = []
    for start in range(0, len(order), micro_batch_size):
        chosen = order[start:start + micro_batch_size]
        width = max(len(seqs[i]) for i in chosen) if by_length else longest
        width = -(-width // width_multiple) * width_multiple
        ids = right_pad([seqs[i] for i in chosen], pad_id, width)
        mask = torch.zeros(len(chosen), width - 1)
        rollout_lp = torch.zeros(len(chosen), width - 1)
        for j, i in enumerate(chosen):
            r = rows[i]
            begin, length = len(prompts[i]) - 1, lengths[r]
            mask[j, begin:begin + length] = 1
            rollout_lp[j, begin:begin + length] = log_probs[r, :length]
        batches.append({
            "input_ids": ids.to(device),
            "position_ids": torch.arange(width).expand(len(chosen), width).to(device),
            "loss_mask": mask.to(device),
            "logit_positions": mask.nonzero().to(device),
            "rollout_log_probs": rollout_lp.to(device),
            "outcome": outcome[chosen].to(device),
            "rows": torch.tensor(chosen, device=device),
        })
        if routes is not None:
            batches[-1]["routes"] = batch_routes(
                [routes.row(rows[i], lengths[rows[i]]) for i in chosen], width)
    return batches, max(b["input_ids"].size(1) for b in batches)


def mini_batches(batches: list[dict], count: int) -> list[list[dict]]:
    """``count`` contiguous groups of micro-batches (the config check made them divide)."""
    per = len(batches) // count
    return [batches[i * per:(i + 1) * per] for i in range(count)]


def sample_rows(shape: RolloutShape, items: list[Scored], rewards: torch.Tensor,
                count: int) -> list[dict]:
    """The first ``count`` prompts of a rollout with their responses and rewards, for people."""
    rows, values = [], rewards.tolist()
    for start in range(0, min(count * shape.k, len(items)), shape.k):
        answers = [{"response": items[i].response_text, "reward": values[i]}
                   for i in range(start, start + shape.k)]
        row = {"prompt": items[start].prompt_text}
        if shape.greedy:
            row["greedy"] = answers.pop(0)
        row["sampled"] = answers
        rows.append(row)
    return rows
