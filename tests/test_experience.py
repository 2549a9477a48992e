"""From a rollout to training rows: which rows each algorithm trains on, reward ids, the split of
rewards into sampled and greedy, and the right-padded micro-batches (hand-built expectations)."""

import torch

from remax_megatron.data.prompts import Prompt
from remax_megatron.rollout.engine import GenerationOutput
from remax_megatron.rollout.sampling import GREEDY, SamplingParams
from remax_megatron.training.experience import (
    RolloutShape, micro_batches, mini_batches, reward_items, split_rewards,
)

SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids)


def test_shapes_of_each_kind_of_rollout():
    remax4 = RolloutShape(n_samples=4, greedy=True)
    assert remax4.k == 5 and remax4.continuations(SAMPLED) == [GREEDY] + [SAMPLED] * 4
    assert remax4.sampled_rows(2) == [1, 2, 3, 4, 6, 7, 8, 9]
    grpo = RolloutShape(n_samples=2, greedy=False)
    assert grpo.continuations(SAMPLED) == [SAMPLED, SAMPLED] and grpo.sampled_rows(2) == [0, 1, 2, 3]


def rollout(rows_tokens, rows_lengths):
    width = max(len(t) for t in rows_tokens)
    tokens = torch.zeros(len(rows_tokens), width, dtype=torch.long)
    for r, t in enumerate(rows_tokens):
        tokens[r, :len(t)] = torch.tensor(t)
    lengths = torch.tensor(rows_lengths)
    mask = torch.arange(width)[None] < lengths[:, None]
    lp = -(tokens.float() / 4) * mask
    return GenerationOutput(tokens=tokens, response_mask=mask, lengths=lengths,
                            finish_reason=["eos" if n < width else "length" for n in rows_lengths],
                            log_probs=lp, prompt_index=torch.zeros(len(rows_tokens)),
                            continuation=torch.zeros(len(rows_tokens)))


def test_remax_pairs_to_rewards_and_training_rows():
    shape = RolloutShape(n_samples=2, greedy=True)  # rows: greedy, sample, sample per prompt
    mine = [(10, Prompt(0, "p", [7, 8])), (11, Prompt(1, "q", [9]))]
    out = rollout([[1], [2, 3], [4, 5], [6], [1, 2], [3]], [1, 2, 2, 1, 2, 1])
    items = reward_items(shape, mine, out, CharTokenizer())
    assert [i.uid for i in items] == [30, 31, 32, 33, 34, 35]  # sample id x 3 + continuation
    assert [i.response_text for i in items] == ["a", "bc", "de", "f", "ab", "c"]
    assert items[3].prompt_ids == [9] and items[1].ended_with_eos is False
    sampled, greedy = split_rewards(shape, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    assert greedy.tolist() == [0.0, 3.0] and sampled.tolist() == [[1.0, 2.0], [4.0, 5.0]]

    outcome = torch.tensor([[0.5, -0.5], [1.5, 2.5]])
    batches, width = micro_batches(shape, mine, out, outcome, pad_id=0, micro_batch_size=3,
                                   device="cpu", by_length=False)
    assert width == 4 and [b["input_ids"].size(0) for b in batches] == [3, 1]
    assert [b["input_ids"].size(1) for b in batches] == [4, 4]  # one width: the longest row's
    assert torch.cat([b["rows"] for b in batches]).tolist() == [0, 1, 2, 3]
    ids = torch.cat([b["input_ids"] for b in batches]).tolist()
    assert ids == [[7, 8, 2, 3], [7, 8, 4, 5], [9, 1, 2, 0], [9, 3, 0, 0]]
    mask = torch.cat([b["loss_mask"] for b in batches]).tolist()
    # next-token frame: position t predicts token t + 1; prompt of 2 -> response from position 1
    assert mask == [[0, 1, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]]
    lp = torch.cat([b["rollout_log_probs"] for b in batches])
    assert lp[0].tolist() == [0.0, -0.5, -0.75] and lp[3].tolist() == [-0.75, 0.0, 0.0]
    assert torch.cat([b["outcome"] for b in batches]).tolist() == [0.5, -0.5, 1.5, 2.5]
    assert batches[0]["position_ids"][0].tolist() == [0, 1, 2, 3]
    # the output layer runs where the loss reads: the (row, position) pairs of the loss mask
    assert batches[1]["logit_positions"].tolist() == [[0, 0]]
    assert batches[0]["logit_positions"].tolist() == [[0, 1], [0, 2], [1, 1], [1, 2], [2, 0],
                                                      [2, 1]]


def test_micro_batches_grouped_by_length_keep_every_row_and_the_mini_batches():
    """Rows sorted longest first within each mini-batch; each micro-batch as wide as its own
    longest row (rounded up to a multiple); every row's tensors travel with it."""
    shape = RolloutShape(n_samples=2, greedy=False)
    mine = [(0, Prompt(0, "p", [7, 8])), (1, Prompt(1, "q", [9])), (2, Prompt(2, "r", [5])),
            (3, Prompt(3, "s", [4, 4, 4]))]
    lengths = [1, 4, 2, 1, 3, 1, 2, 5]  # row totals: 3 6 3 2 4 2 5 8
    out = rollout([[1 + t for t in range(n)] for n in lengths], lengths)
    outcome = torch.arange(8.0).view(4, 2)
    plain, _ = micro_batches(shape, mine, out, outcome, 0, 2, "cpu", groups=2, by_length=False)
    grouped, width = micro_batches(shape, mine, out, outcome, 0, 2, "cpu", groups=2,
                                   width_multiple=4)
    assert width == 8
    # mini-batch 1 holds rows 0-3, mini-batch 2 rows 4-7, each sorted by length (stable)
    assert [b["rows"].tolist() for b in grouped] == [[1, 0], [2, 3], [7, 6], [4, 5]]
    assert [b["input_ids"].size(1) for b in grouped] == [8, 4, 8, 4]  # 6, 3, 8, 4 rounded up
    by_row = {}
    for b in plain:
        for j, row in enumerate(b["rows"].tolist()):
            by_row[row] = {k: b[k][j] for k in ("input_ids", "loss_mask", "rollout_log_probs",
                                                "outcome")}
    for b in grouped:
        for j, row in enumerate(b["rows"].tolist()):
            w = b["input_ids"].size(1)
            want = by_row[row]
            assert b["outcome"][j] == want["outcome"] == row
            for key, size in (("input_ids", w), ("loss_mask", w - 1), ("rollout_log_probs", w - 1)):
                full = want[key]
                assert torch.equal(b[key][j], full[:size]) and not full[size:].any(), (row, key)


def test_mini_batches_are_contiguous_groups_of_micro_batches():
    assert mini_batches(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]
    assert mini_batches(list(range(4)), 1) == [[0, 1, 2, 3]]
