"""Supervised fine-tuning rows: JSONL / parquet rows of {"prompt": text, "response": text} (or
"completion", TRL's name) or {"messages": [chat turns]}, as token ids with the tokens the loss
trains marked.

prompt/response: the prompt tokenized exactly as RL rollouts see it (data/prompts.py), then the
response and the tokenizer's EOS: the fine-tuned model learns to stop where `train` stops.
messages: the chat template's tokens; every assistant turn is trained (its span is the template
of the conversation up to it minus the template up to the generation prompt before it), every
other token is context.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config_io import ConfigError
from .prompts import read_rows, tokenize

RESPONSE_KEYS = ("response", "completion")


@dataclass
class Example:
    index: int  # position in the input file
    ids: list[int]
    trained: list[int]  # 1 where the token is a target of the loss (never the first token)


class BadRows:
    """Rows that cannot be used, by problem: reported in one line after the whole file is read."""

    def __init__(self, path):
        self.path = path
        self.problems: dict[str, list[int]] = {}

    def add(self, problem: str, row: int) -> None:
        self.problems.setdefault(problem, []).append(row)

    def raise_any(self) -> None:
        if not self.problems:
            return
        problem, rows = next(iter(self.problems.items()))
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        more = (f" (and {sum(map(len, self.problems.values())) - len(rows)} rows with other "
                "problems)" if len(self.problems) > 1 else "")
        raise ConfigError(f"{self.path}: {len(rows)} row(s) {problem} (rows {shown}){more}: fix "
                          "or remove them")


def eos_id(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def response_ids(tokenizer, text: str) -> list[int]:
    """A response's tokens as a rollout produces them: no special tokens before, EOS after."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) + eos_id(tokenizer)


def _template(tokenizer, messages, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns an encoding
        ids = ids["input_ids"]
    return list(ids)


def chat_example(tokenizer, messages: list, index: int) -> Example | str:
    """The conversation's tokens with every assistant turn trained; a problem's text instead
    when the template cannot be split so."""
    if not getattr(tokenizer, "chat_template", None):
        return "have \"messages\" but the tokenizer has no chat template"
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return "have a message that is not {\"role\": ..., \"content\": text}"
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        return "have no assistant message to train on"
    ids = _template(tokenizer, messages, False)
    trained = [0] * len(ids)
    for i in turns:
        before = _template(tokenizer, messages[:i], True) if i else []
        through = _template(tokenizer, messages[:i + 1], False)
        if ids[:len(through)] != through or through[:len(before)] != before:
            return ("have a chat template that rewrites earlier turns (the assistant turns "
                    "cannot be told apart): give prompt/response rows")
        if len(through) == len(before):
            return "have an empty assistant message"
        trained[len(before):len(through)] = [1] * (len(through) - len(before))
    trained[0] = 0
    return Example(index, ids, trained)


def sft_example(tokenizer, row: dict, index: int, where: str) -> Example | str:
    if isinstance(row.get("messages"), list):
        return chat_example(tokenizer, row["messages"], index)
    response = next((row[k] for k in RESPONSE_KEYS if k in row), None)
    if "prompt" not in row or response is None:
        return "lack \"prompt\" and \"response\" (or \"completion\") strings, or \"messages\""
    if not isinstance(response, str) or not isinstance(row["prompt"], (str, list)):
        return "have a prompt or response that is not text"
    if not response.strip():
        return "have an empty response"
    prompt_row = {"prompt": row["prompt"]} if isinstance(row["prompt"], str) else {
        "messages": row["prompt"]}
    _, prompt = tokenize(tokenizer, prompt_row, where)
    answer = response_ids(tokenizer, response)
    return Example(index, prompt + answer, [0] * len(prompt) + [1] * len(answer))


def load_rows_as(path, tokenizer, make) -> list:
    """Every row through ``make(tokenizer, row, index, where)`` (an example, or a problem's
    text); one line naming the bad rows, when there are any."""
    rows = read_rows(path)
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    bad, out = BadRows(path), []
    for index, row in enumerate(rows):
        result = make(tokenizer, row, index, f"{path} row {index + 1}")
        if isinstance(result, str):
            bad.add(result, index + 1)
        else:
            out.append(result)
    bad.raise_any()
    return out


def load_sft(path, tokenizer) -> list[Example]:
    return load_rows_as(path, tokenizer, sft_example)
