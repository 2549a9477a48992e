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


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="KV-cached generation from a checkpoint (tp/pp/dp)")
    p.add_argument("--load", required=True, help="remax-megatron checkpoint directory")
    p.add_argument("--input", required=True, help='JSONL of {"prompt": ...} or {"messages": ...}')
    p.add_argument("--output", required=True, help="JSONL written in input order")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch per dp rank")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--pipeline-micro-batches", type=int, default=0,
                   help="with --pp > 1: prompt groups that follow each other through the stages "
                        "(0: auto, the prefill in 2 x pp groups)")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from .rollout.generate_command import GenerateArgs, run_generate, sampling_from_flags

    sampling = sampling_from_flags(args.greedy, args.temperature, args.top_p, args.top_k)
    return run_generate(GenerateArgs(
        load=args.load, input=args.input, output=args.output, sampling=sampling,
        max_new_tokens=args.max_new_tokens, tp=args.tp, pp=args.pp, seed=args.seed,
        batch_size=args.batch_size, tokenizer=args.tokenizer,
        pipeline_micro_batches=args.pipeline_micro_batches))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="ReMax training (no --config: the built-in demo)")
    p.add_argument("--config", help="run config YAML (default: the built-in demo)")
    p.add_argument("--output-dir", help="where metrics, plots and checkpoints go")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.lr=1e-6 parallel.tp=2")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from .training import demo
    from .training.config import load_config
    from .training.trainer import Trainer

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir
                                        else [])
    cfg = load_config(args.config, overrides, base=None if args.config else demo.config())
    trainer = Trainer(cfg, resume=args.resume)
    try:
        trainer.run()
    finally:
        trainer.close()
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
    _add_generate(sub)
    _add_train(sub)
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
