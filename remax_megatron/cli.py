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


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="HF <-> megatron-core checkpoint conversion")
    verbs = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_mcore = verbs.add_parser("hf-to-mcore", help="a transformers directory -> a checkpoint")
    to_mcore.add_argument("--hf", required=True, help="save_pretrained directory")
    to_mcore.add_argument("--out", required=True, help="new checkpoint directory")
    to_mcore.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                          help="parameter dtype (auto: as stored)")
    to_mcore.add_argument("--model-type", default="auto", choices=("auto", "causal-lm", "reward"))
    to_mcore.add_argument("--force", action="store_true", help="replace a non-empty --out")
    to_mcore.set_defaults(run=_run_hf_to_mcore)
    to_hf = verbs.add_parser("mcore-to-hf", help="a checkpoint (any tp/pp) -> a transformers dir")
    to_hf.add_argument("--load", required=True, help="remax-megatron checkpoint directory")
    to_hf.add_argument("--out", required=True, help="new transformers directory")
    to_hf.add_argument("--max-shard-gib", type=float, default=2.0)
    to_hf.add_argument("--force", action="store_true", help="replace a non-empty --out")
    to_hf.set_defaults(run=_run_mcore_to_hf)


def _run_hf_to_mcore(args) -> int:
    from .convert.commands import hf_to_mcore

    hf_to_mcore(args.hf, args.out, dtype=args.dtype, model_type=args.model_type, force=args.force)
    return 0


def _run_mcore_to_hf(args) -> int:
    from .convert.commands import mcore_to_hf

    mcore_to_hf(args.load, args.out, force=args.force, max_shard_gib=args.max_shard_gib)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remax-megatron",
        description="ReMax RLHF on megatron-core: tensor/pipeline-parallel GPT-2 and Llama.",
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_info(sub)
    _add_convert(sub)
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
