#!/usr/bin/env python
"""HF <-> Megatron checkpoint conversion; the same entry as `remax-megatron convert`.

  python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR [--dtype fp32|bf16|fp16]
                                                [--model-type auto|causal-lm|reward] [--force]
  python tools/convert_checkpoint.py mcore-to-hf --load DIR --out DIR [--force]
"""

import sys

from remax_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
