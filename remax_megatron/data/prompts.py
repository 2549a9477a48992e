"""Prompt files: JSONL or parquet rows of {"prompt": text} or {"messages": [chat turns]}.

A prompt is tokenized exactly as ``tokenizer(text)`` does by default; messages go through the
tokenizer's chat template with the generation prompt appended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config_io import ConfigError


@dataclass
class Prompt:
    index: int  # position in the input file
    text: str  # the prompt as the model sees it (chat template applied)
    ids: list[int]


def read_rows(path) -> list[dict]:
    """Every row of a .jsonl / .json-lines or .parquet file, as dicts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow's ArrowInvalid / OSError for a damaged file
            raise ConfigError(f"{path} is not a readable parquet file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}): rewrite it, "
                              "or give JSONL") from None
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path} line {number} is not UTF-8 (byte {raw[err.start]:#04x} "
                                  f"at column {err.start + 1}): save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} line {number} is not valid JSON ({err.msg}): fix that "
                                  "line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number} must be a JSON object with a \"prompt\" "
                                  "or \"messages\" key")
            rows.append(row)
    return rows


def tokenize(tokenizer, row: dict, where: str) -> tuple[str, list[int]]:
    """(prompt text, token ids) for one row."""
    if isinstance(row.get("prompt"), str):
        text = row["prompt"]
        return text, list(tokenizer(text).input_ids)
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{where} has \"messages\" but the tokenizer has no chat template: "
                              "use \"prompt\" rows or a tokenizer with a chat_template")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns an encoding
            ids = ids["input_ids"]
        return text, list(ids)
    raise ConfigError(f"{where} needs a \"prompt\" string or a non-empty \"messages\" list")


def load_prompts(path, tokenizer) -> list[Prompt]:
    rows = read_rows(path)
    if not rows:
        raise ConfigError(f"prompt file {path} holds no rows")
    out = []
    for index, row in enumerate(rows):
        text, ids = tokenize(tokenizer, row, f"{path} row {index + 1}")
        if not ids:
            raise ConfigError(f"{path} row {index + 1} tokenizes to nothing: give it some text")
        out.append(Prompt(index=index, text=text, ids=ids))
    return out
