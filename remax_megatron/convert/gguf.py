"""A GGUF file (llama.cpp's format) -> a plain Hugging Face ``save_pretrained`` directory.

transformers reads GGUF (``from_pretrained(dir, gguf_file=...)``, dequantized to floats) but
refuses to ``save_pretrained`` such a model; a fresh model built from the same config with the
dequantized state dict saves normally, and then converts like any other HF directory.
Needs the optional packages ``gguf`` and ``accelerate`` (``pip install -e ".[real]"``); never a
runtime dependency of training.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import torch

from ..config_io import ConfigError
from .hf_files import directory_is_empty, replace_directory, tmp_sibling

log = logging.getLogger(__name__)

GGUF_PACKAGES = ("gguf", "accelerate")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_gguf_packages() -> None:
    missing = [p for p in GGUF_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"reading GGUF needs {' and '.join(missing)}: pip install -e "
                          "\".[real]\" (or pip install gguf accelerate)")


def gguf_to_hf(gguf_path, out, dtype: str = "fp32", force: bool = False) -> Path:
    """Dequantize ``gguf_path`` into ``out`` (weights, config, tokenizer, generation config).

    Written into a temporary sibling directory and renamed into place when complete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: use {' or '.join(DTYPES)}")
    if not gguf_path.is_file():
        raise ConfigError(f"{gguf_path} does not exist")
    if not directory_is_empty(out) and not force:
        raise ConfigError(f"{out} is not empty: choose a new directory or pass --force")
    check_gguf_packages()
    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    log.info("dequantizing %s", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = loaded.config
    # a plain model of the same config: transformers will not save one it read from GGUF
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = DTYPES[dtype]
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.to(DTYPES[dtype])
    plain.generation_config = loaded.generation_config
    tmp = tmp_sibling(out)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %s)", out, type(loaded).__name__, dtype)
    return out
