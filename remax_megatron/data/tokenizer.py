"""Tokenizers: loaded from a checkpoint's tokenizer/ (or a directory) and checked against the model."""

from __future__ import annotations

import json
from pathlib import Path

from ..config_io import ConfigError


def load_tokenizer(checkpoint, override=None):
    """The tokenizer a checkpoint carries, or ``override`` (a directory); checked to fit its vocab."""
    from transformers import AutoTokenizer

    path = Path(override) if override else checkpoint.tokenizer_dir
    if path is None:
        raise ConfigError(f"checkpoint {checkpoint.path} has no tokenizer/: pass --tokenizer DIR "
                          "(a directory with the model's tokenizer files)")
    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer directory {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    check_fits(tokenizer, checkpoint.config.vocab_size, str(path))
    return tokenizer


def check_fits(tokenizer, vocab_size: int, where: str) -> None:
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer at {where} has {len(tokenizer)} ids but the model's "
                          f"vocabulary has {vocab_size}: use the tokenizer the model was trained "
                          "with")


def pad_id(tokenizer) -> int:
    """The id padding positions hold (never read: masked or after a row's end); 0 without one."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def eos_token_ids(tokenizer, checkpoint=None) -> list[int]:
    """The tokenizer's EOS plus any in the checkpoint's generation_config.json."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = Path(checkpoint.path) / "generation_config.json" if checkpoint is not None else None
    if config is not None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return sorted(ids)
