"""The SmolLM2 example's task: pick the largest or the smallest of a few numbers.

Every answer is checkable from the prompt alone, so the rule reward needs no answer key:

    Which is the largest of these numbers: 41, 87, 12, 65? Answer with the number only.

``make_data`` writes seeded train and held-out eval files of chat rows; ``exact_answer`` is the
rule reward (``reward.rule: examples/smollm2/task.py:exact_answer``).

Answer extraction (documented in the README): the question is the last user turn in the prompt;
the answer is the LAST integer in the response (thousands commas removed, a leading minus
kept), as GSM8K-style graders read a final answer. A response with no integer scores 0.
A response cut at the length limit is read the same way: what it says last is its answer.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

LARGEST = ("Which is the largest of these numbers: {}?",
           "What is the biggest number in this list: {}?",
           "Find the largest number among {}.",
           "Out of {}, which number is the largest?")
SMALLEST = ("Which is the smallest of these numbers: {}?",
            "What is the lowest number in this list: {}?",
            "Find the smallest number among {}.",
            "Out of {}, which number is the smallest?")
INSTRUCTION = " Answer with the number only."
SYSTEM = "You are a helpful assistant. Answer briefly."

# what a question asks for and the numbers it lists, read back from the prompt text
_ASKS = re.compile(r"(largest|biggest|smallest|lowest)")
_LIST = re.compile(r"(-?\d+(?:, -?\d+)+)")
_INT = re.compile(r"-?\d+")


def question(rng: random.Random) -> tuple[str, int]:
    """One question and its answer: 3 to 5 distinct two-digit numbers."""
    numbers = rng.sample(range(10, 100), rng.randint(3, 5))
    largest = rng.random() < 0.5
    template = rng.choice(LARGEST if largest else SMALLEST)
    text = template.format(", ".join(map(str, numbers))) + INSTRUCTION
    return text, max(numbers) if largest else min(numbers)


def row(text: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": text}]}


def make_data(out: Path, train: int, evaluation: int, seed: int) -> None:
    """train.jsonl and eval.jsonl under ``out``; no eval question appears in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {"eval.jsonl": evaluation, "train.jsonl": train}
    out.mkdir(parents=True, exist_ok=True)
    for name, count in splits.items():
        rows = []
        while len(rows) < count:
            text, _ = question(rng)
            if text not in seen:
                seen.add(text)
                rows.append(row(text))
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / name)


def expected_answer(prompt: str) -> int | None:
    """The answer a prompt's last question asks for (None if it asks nothing we know)."""
    asks = _ASKS.findall(prompt)
    listed = _LIST.findall(prompt)
    if not asks or not listed:
        return None
    numbers = [int(x) for x in listed[-1].split(", ")]
    return max(numbers) if asks[-1] in ("largest", "biggest") else min(numbers)


def extract_answer(response: str) -> int | None:
    """The last integer in the response (thousands commas removed), or None."""
    found = _INT.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", response))
    return int(found[-1]) if found else None


def exact_answer(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 when the response's last integer is the asked-for number, else 0.0."""
    out = []
    for prompt, response in zip(prompts, responses):
        want, got = expected_answer(prompt), extract_answer(response)
        out.append(float(want is not None and got == want))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="write the task's train and eval files")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--train", type=int, default=2048, help="train questions")
    parser.add_argument("--eval", type=int, default=256, help="held-out questions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_data(args.out, args.train, args.eval, args.seed)
    print(f"wrote {args.out}/train.jsonl ({args.train}) and {args.out}/eval.jsonl ({args.eval})")


if __name__ == "__main__":
    main()
