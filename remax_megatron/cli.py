"""`remax-megatron VERB ...`: the command line. Each verb parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import os
import sys

from .config_io import ConfigError


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, backend, devices and the parallel layout")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to lay out")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to lay out")
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from .info import run_info

    report = run_info(tp=args.tp, pp=args.pp, backend=args.backend)
    if report:
        print(report, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remax-megatron",
        description="ReMax RLHF on megatron-core: tensor/pipeline-parallel GPT-2 and Llama.",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_info(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .logging_utils import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.run(args)
    except ConfigError as err:
        # Bad input: one line that says what to change, no traceback. Every rank sees the same
        # input, so rank 0 speaks for all of them.
        if os.environ.get("RANK", "0") == "0":
            print(f"remax-megatron {args.verb}: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
