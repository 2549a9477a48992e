"""What every multi-rank worker shares: its command line and writing its report on rank 0."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch.distributed as dist


def layout_parser() -> argparse.ArgumentParser:
    """--ref (the reference file), --report (JSON written by rank 0), --tp, --pp, --ep."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    return parser


def reference_parser() -> argparse.ArgumentParser:
    """For workers with two modes: --reference PATH (one process writes the plain-torch
    reference) or --check PATH --report OUT (every rank runs the layout: --tp, --pp)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference")
    parser.add_argument("--check")
    parser.add_argument("--report")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    return parser


def write_report(path: str, report: dict) -> None:
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(report, indent=1))
