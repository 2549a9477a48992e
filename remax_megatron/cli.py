"""`remax-megatron VERB ...`: the command line. Each verb parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

from .config_io import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING")
ERROR_GRACE_SECONDS = 5.0


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


LOAD_HELP = ("a remax-megatron checkpoint directory, or a training run directory, its "
             "checkpoints/ or checkpoints/latest (the newest complete checkpoint)")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="HF <-> megatron-core checkpoint conversion")
    verbs = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_mcore = verbs.add_parser("hf-to-mcore", help="a transformers directory -> a checkpoint")
    to_mcore.add_argument("--hf", required=True, help="save_pretrained directory")
    to_mcore.add_argument("--out", required=True, help="new checkpoint directory")
    to_mcore.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                          help="parameter dtype (auto: as stored) (default: %(default)s)")
    to_mcore.add_argument("--model-type", default="auto", choices=("auto", "causal-lm", "reward"),
                          help="auto: from config.json's architecture (default: %(default)s)")
    to_mcore.add_argument("--force", action="store_true",
                          help="replace a non-empty --out (default: refuse)")
    to_mcore.set_defaults(run=_run_hf_to_mcore)
    to_hf = verbs.add_parser("mcore-to-hf", help="a checkpoint (any tp/pp) -> a transformers dir")
    to_hf.add_argument("--load", required=True, help=LOAD_HELP)
    to_hf.add_argument("--out", required=True, help="new transformers directory")
    to_hf.add_argument("--max-shard-gib", type=float, default=2.0,
                       help="largest safetensors file in GiB (default: %(default)s)")
    to_hf.add_argument("--force", action="store_true",
                       help="replace a non-empty --out (default: refuse)")
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
    p = sub.add_parser(
        "generate", help="KV-cached generation from a checkpoint (tp/pp/dp)",
        description="KV-cached generation from a checkpoint, as one process or under torchrun. "
                    "Decoding is greedy unless --temperature, --top-p or --top-k is given; then "
                    "it samples with all three, the unset ones at temperature 1.0, top-p 1.0 and "
                    "top-k 0 (no filtering).")
    p.add_argument("--load", required=True, help=LOAD_HELP)
    p.add_argument("--input", required=True, help='JSONL of {"prompt": ...} or {"messages": ...}')
    p.add_argument("--output", required=True, help="JSONL written in input order")
    p.add_argument("--greedy", action="store_true",
                   help="greedy decoding (the default when no sampling flag is given)")
    p.add_argument("--temperature", type=float,
                   help="sampling temperature, > 0 (default: unset: greedy; 1.0 when another "
                        "sampling flag is given)")
    p.add_argument("--top-p", type=float,
                   help="nucleus, in (0, 1] (default: unset: greedy; 1.0, no limit, when another "
                        "sampling flag is given)")
    p.add_argument("--top-k", type=int,
                   help="the k likeliest tokens (default: unset: greedy; 0, no limit, when another "
                        "sampling flag is given)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="response length limit (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: %(default)s)")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel size (default: %(default)s)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size of a mixture-of-experts model: its experts split "
                        "over ep of the dp ranks (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; a row's samples depend only on it and the row "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts per batch per dp rank (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--pipeline-micro-batches", type=int, default=0,
                   help="with --pp > 1: prompt groups that follow each other through the stages "
                        "(0: auto, the prefill in 2 x pp groups) (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="weights' dtype while generating (auto: as the checkpoint stores them; "
                        "bf16 runs on GPUs and on CPUs with AVX512-BF16 or AMX) "
                        "(default: %(default)s)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="on a GPU, run every decode step eagerly instead of replaying one "
                        "captured CUDA graph (the same tokens up to float rounding at near-ties)")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    from .rollout.generate_command import GenerateArgs, run_generate, sampling_from_flags

    sampling = sampling_from_flags(args.greedy, args.temperature, args.top_p, args.top_k)
    return run_generate(GenerateArgs(
        load=args.load, input=args.input, output=args.output, sampling=sampling,
        max_new_tokens=args.max_new_tokens, tp=args.tp, pp=args.pp, ep=args.ep, seed=args.seed,
        batch_size=args.batch_size, tokenizer=args.tokenizer,
        pipeline_micro_batches=args.pipeline_micro_batches, dtype=args.dtype,
        cuda_graph=args.cuda_graph))


def _add_run_options(p) -> None:
    """The options of every training verb (train, sft, train-rm)."""
    p.add_argument("--output-dir", help="where metrics, plots and checkpoints go")
    p.add_argument("--resume", nargs="?", const="yes", default="no", choices=("yes", "auto"),
                   metavar="auto",
                   help="continue from the output directory's newest complete checkpoint (an "
                        "error when there is none); --resume auto: continue if there is one, "
                        "else start (for jobs that are requeued)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output directory that holds a previous run, removing "
                        "that run's files (only those)")
    p.add_argument("--allow-other-files", action="store_true",
                   help="start in an output directory that holds files no remax-megatron run "
                        "wrote there (they are never touched; a file named like one the run "
                        "writes is still refused)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every default filled in) as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.lr=1e-6 parallel.tp=2")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="ReMax training (no --config: the built-in demo)")
    p.add_argument("--config", help="run config YAML (default: the built-in demo)")
    _add_run_options(p)
    p.set_defaults(run=_run_train)


def _add_finetune(sub) -> None:
    for verb, what in (("sft", "supervised fine-tuning of a policy on prompt/response or chat "
                                "rows"),
                       ("train-rm", "reward-model training on preference pairs (chosen, "
                                    "rejected)")):
        p = sub.add_parser(verb, help=what, description=f"{what[0].upper()}{what[1:]}: the "
                           "same layouts, checkpoints and resume as train.")
        p.add_argument("--config", help="config YAML (or give every setting as key=value)")
        _add_run_options(p)
        p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from .training.finetune_config import RMConfig, SFTConfig, load_finetune_config

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir
                                        else [])
    cfg = load_finetune_config(SFTConfig if args.verb == "sft" else RMConfig, args.config,
                               overrides)
    if args.print_config:
        import yaml

        from .config_io import to_dict
        from .runtime.distributed import read_launch_env
        from .training.finetune_config import check_finetune_config

        launch = read_launch_env()
        world = launch.world_size if launch.under_torchrun else (
            cfg.parallel.tp * cfg.parallel.pp)
        check_finetune_config(cfg, world)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="", flush=True)
        return 0
    if args.verb == "sft":
        from .training.sft import SFTRun as Run
    else:
        from .training.reward_training import RewardModelRun as Run
    return _train_with(Run, cfg, args)


def _run_train(args) -> int:
    from .training import demo
    from .training.config import load_config
    from .training.trainer import Trainer

    overrides = list(args.overrides) + ([f"output_dir={args.output_dir}"] if args.output_dir
                                        else [])
    cfg = load_config(args.config, overrides, base=None if args.config else demo.config())
    if args.print_config:
        import yaml

        from .training.config import snapshot
        from .training.config_checks import check_config

        check_config(cfg, _world_size_to_check(cfg))  # print only what train would accept
        print(yaml.safe_dump(snapshot(cfg), sort_keys=False), end="", flush=True)
        return 0
    return _train_with(Trainer, cfg, args)


def _train_with(run_class, cfg, args) -> int:
    run = run_class(cfg, resume=args.resume, overwrite=args.overwrite,
                    allow_other_files=args.allow_other_files)
    try:
        run.run()
    finally:
        run.close()
    return 0


def _world_size_to_check(cfg) -> int:
    """torchrun's world size; outside it, the least one that both the policy's and the reward
    model's layouts fit (--print-config is often run without a launcher)."""
    from .runtime.distributed import read_launch_env

    launch = read_launch_env()
    if launch.under_torchrun:
        return launch.world_size
    return max(1, math.lcm(cfg.parallel.tp * cfg.parallel.pp, cfg.reward.tp * cfg.reward.pp))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="remax-megatron",
        description="ReMax RLHF on megatron-core: tensor/pipeline-parallel GPT-2 and Llama.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the versions of remax-megatron, megatron-core, torch and "
                             "transformers and exit")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="INFO (default) shows progress; WARNING only problems")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_info(sub)
    _add_convert(sub)
    _add_generate(sub)
    _add_train(sub)
    _add_finetune(sub)
    _accept_everywhere(parser, "--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                       help="as before the verb")
    return parser


def _accept_everywhere(parser: argparse.ArgumentParser, *flags, **options) -> None:
    """Let a top-level option also come after any verb (SUPPRESS keeps the top-level default)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb_parser in action.choices.values():
                verb_parser.add_argument(*flags, **options)
                _accept_everywhere(verb_parser, *flags, **options)


class _Version(argparse.Action):
    """--version without argparse's line wrapping (and without importing torch)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line(), flush=True)
        parser.exit()


def _resume_flag(argv: list[str]) -> list[str]:
    """`--resume` takes an optional `auto`; anything else after it (an override) is not its
    value, so a bare --resume is spelled out for argparse."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--resume" and (i + 1 == len(out) or out[i + 1] != "auto"):
            out[i] = "--resume=yes"
    return out


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in ("remax-megatron", "megatron-core", "torch", "transformers"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} (not installed)")
    return f"{parts[0]} ({', '.join(parts[1:])})"


def main(argv: list[str] | None = None) -> int:
    from .logging_utils import setup_logging
    from .runtime.lifetime import adopt_from_environment

    adopt_from_environment()

    parser = build_parser()
    args, extra = parser.parse_known_args(_resume_flag(sys.argv[1:] if argv is None else argv))
    # argparse takes positionals in one run; overrides after an option (`--resume x=1`) come here
    if getattr(args, "overrides", None) is not None:
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.log_level)
    try:
        return args.run(args)
    except ConfigError as err:
        # Bad input: one line that says what to change, no traceback. Every rank sees the same
        # input, so rank 0 speaks for all of them.
        if os.environ.get("RANK", "0") == "0":
            print(f"remax-megatron {args.verb}: error: {err}", file=sys.stderr, flush=True)
        else:
            # torchrun stops every rank as soon as one exits: let rank 0 print first; a rank
            # still alive after that failed alone, and says so itself
            time.sleep(ERROR_GRACE_SECONDS)
            print(f"remax-megatron {args.verb}: error on rank {os.environ['RANK']}: {err}",
                  file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
