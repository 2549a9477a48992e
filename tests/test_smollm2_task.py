"""examples/smollm2's task: the seeded data files and the rule reward's answer extraction,
against hand-written cases."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples" / "smollm2"))
import task  # noqa: E402

CHAT = ("<|im_start|>system\n" + task.SYSTEM + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.parametrize("question,answer", [
    ("Which is the largest of these numbers: 41, 87, 12, 65? Answer with the number only.", 87),
    ("What is the lowest number in this list: 89, 42, 78? Answer with the number only.", 42),
    ("Find the biggest number among 10, 99, 98, 11, 50.", 99),
    ("Out of 33, 31, 32, which number is the smallest?", 31),
    ("What is the capital of France?", None),
])
def test_expected_answer_is_read_from_the_prompt(question, answer):
    assert task.expected_answer(CHAT.format(question)) == answer


@pytest.mark.parametrize("response,extracted", [
    ("The largest number is 87.", 87),
    ("87", 87),
    ("Comparing 41 and 87, the answer is 87", 87),  # the LAST integer
    ("The largest of 41, 87, 12", 12),  # cut at the length limit: what it says last
    ("It is 1,087 or so", 1087),  # thousands commas
    ("-5 is smallest", -5),
    ("I cannot tell.", None),
    ("", None),
])
def test_answer_is_the_last_integer(response, extracted):
    assert task.extract_answer(response) == extracted


def test_reward_is_exact_match():
    prompt = CHAT.format("Which is the largest of these numbers: 41, 87, 12, 65? Answer with the "
                         "number only.")
    assert task.exact_answer([prompt] * 4, ["87", "The answer is 87.", "65", ""]) == [
        1.0, 1.0, 0.0, 0.0]
    assert task.exact_answer([CHAT.format("Hello?")], ["87"]) == [0.0]


def test_data_is_seeded_and_eval_is_held_out(tmp_path):
    task.make_data(tmp_path / "a", 200, 50, seed=3)
    task.make_data(tmp_path / "b", 200, 50, seed=3)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    rows = {name: [json.loads(line) for line in (tmp_path / "a" / name).read_text().splitlines()]
            for name in ("train.jsonl", "eval.jsonl")}
    assert len(rows["train.jsonl"]) == 200 and len(rows["eval.jsonl"]) == 50
    questions = {n: {r["messages"][-1]["content"] for r in rows[n]} for n in rows}
    assert not questions["train.jsonl"] & questions["eval.jsonl"]
    for row in rows["eval.jsonl"]:
        assert task.expected_answer(CHAT.format(row["messages"][-1]["content"])) is not None


@pytest.mark.parametrize("name,algorithm", [("remax", "remax"), ("rloo", "rloo"), ("grpo", "grpo")])
def test_example_configs_load_and_keep_the_measured_budget(name, algorithm):
    """The README's figures come from these files: both load (no unknown key), name their
    algorithm and sample 32 responses per step with the task's rule and files."""
    from remax_megatron.training.config import load_config

    cfg = load_config(str(ROOT / "examples" / "smollm2" / f"{name}.yaml"), [])
    assert cfg.algorithm.name == algorithm
    assert cfg.train.global_batch_size * cfg.rollout.n_samples == 32
    assert cfg.reward.rule == "examples/smollm2/task.py:exact_answer"
    assert cfg.rollout.tempered_log_probs and cfg.rollout.top_p == 1.0
    assert cfg.data.path.startswith("examples/smollm2/data/")
