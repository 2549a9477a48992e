"""checkpoint.export_hf: the final training checkpoint as a Hugging Face directory."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from ..config_io import ConfigError
from ..runtime.lifetime import PARENT_VARIABLE

log = logging.getLogger(__name__)

HF_DIR = "hf"  # checkpoint.export_hf writes OUTPUT/hf
# launcher variables a child process must not inherit (it would think it is one of the ranks)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")


def export_hf(checkpoint: Path, out: Path) -> None:
    """checkpoint.export_hf: the final checkpoint as a Hugging Face directory, written by
    `convert mcore-to-hf` in a process of its own (one process, on the CPU: the conversion
    streams, and the training ranks keep their process groups and GPUs)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES
           and not k.startswith("TORCHELASTIC_") and k != "REMAX_BACKEND"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    # no preexec_fn (it would fork this large, threaded process): the child ties itself to us
    env[PARENT_VARIABLE] = str(os.getpid())
    log.info("exporting %s to %s (Hugging Face format)", checkpoint, out)
    command = [sys.executable, "-m", "remax_megatron", "convert", "mcore-to-hf",
               "--load", str(checkpoint), "--out", str(out), "--force"]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if result.returncode != 0:
        tail = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
        raise ConfigError(f"checkpoint.export_hf: exporting {checkpoint} to {out} failed "
                          f"({tail[0]}); the checkpoint itself is intact: export it with "
                          f"remax-megatron convert mcore-to-hf --load {checkpoint} --out DIR")
