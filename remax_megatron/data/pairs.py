"""Preference pairs for reward-model training: JSONL / parquet rows of
  {"prompt": text or [chat turns], "chosen": text, "rejected": text}, or (chat form, as in
  Anthropic HH / TRL) {"chosen": [chat turns], "rejected": [chat turns]}: two conversations that
  differ in their last, assistant turn.

Each side is tokenized exactly as RL scores a rollout (reward/model.py): the prompt as the policy
sees it (chat template with the generation prompt), then the response and EOS; the reward is
read at that last token.
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import tokenize
from .sft import load_rows_as, response_ids


@dataclass
class Pair:
    index: int  # position in the input file
    chosen: list[int]
    rejected: list[int]

    @property
    def ids(self) -> list[int]:
        """The longer side (what a length limit applies to)."""
        return max(self.chosen, self.rejected, key=len)


def _split_chat(row: dict) -> tuple[list, str, str] | str:
    chosen, rejected = row["chosen"], row["rejected"]
    if not chosen or not rejected or any(
            not isinstance(m, dict) or not isinstance(m.get("content"), str)
            for m in chosen + rejected):
        return "have chosen/rejected conversations that are not lists of {role, content}"
    if chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
        return "have a chosen or rejected conversation that does not end in an assistant turn"
    if chosen[:-1] != rejected[:-1]:
        return "have chosen and rejected conversations that differ before their last turn"
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def pair(tokenizer, row: dict, index: int, where: str) -> Pair | str:
    """The row as a Pair, or a problem's text."""
    if "chosen" not in row or "rejected" not in row:
        return "lack \"chosen\" and \"rejected\""
    if isinstance(row["chosen"], list) and isinstance(row["rejected"], list) and (
            "prompt" not in row):
        split = _split_chat(row)
        if isinstance(split, str):
            return split
        context, chosen, rejected = split
        if not context:
            return "have conversations with no turn before the answers"
        prompt_row = {"messages": context}
    else:
        chosen, rejected = row["chosen"], row["rejected"]
        prompt = row.get("prompt")
        if not isinstance(prompt, (str, list)) or not prompt:
            return "lack a \"prompt\" (text or chat turns) for their chosen/rejected texts"
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            return "have chosen/rejected that are not text (or give both as conversations)"
        prompt_row = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
    if not chosen.strip() or not rejected.strip():
        return "have an empty chosen or rejected response"
    if chosen == rejected:
        return "have chosen == rejected (nothing to prefer)"
    _, prompt_ids = tokenize(tokenizer, prompt_row, where)
    return Pair(index, prompt_ids + response_ids(tokenizer, chosen),
                prompt_ids + response_ids(tokenizer, rejected))


def load_pairs(path, tokenizer) -> list[Pair]:
    return load_rows_as(path, tokenizer, pair)
