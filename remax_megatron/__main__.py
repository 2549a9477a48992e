"""`python -m remax_megatron VERB` (and `torchrun ... -m remax_megatron VERB`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
