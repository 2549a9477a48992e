"""`remax-megatron generate`: JSONL prompts in, JSONL responses out, as one process or under
torchrun (tp x pp x dp; each data-parallel rank takes every dp-th prompt; ep: a mixture of experts'
experts split over ep of the dp ranks)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config_io import ConfigError, atomic_write_text
from ..data.prompts import load_prompts
from ..data.tokenizer import eos_token_ids, load_tokenizer, pad_id
from ..models.builder import dtype_from_name
from ..models.checkpoint import load_model, read_checkpoint
from ..models.locate import resolve_checkpoint
from ..path_checks import check_apart
from ..runtime.layout import validate_layout
from ..runtime.precision import check_precision
from ..seeds import MAX_SEED
from .engine import generate
from .sampling import GREEDY, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class GenerateArgs:
    load: str
    input: str
    output: str
    sampling: SamplingParams
    max_new_tokens: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    seed: int = 0
    batch_size: int = 16
    tokenizer: str | None = None
    pipeline_micro_batches: int = 0
    dtype: str = "auto"  # the weights' dtype for generation; auto: as the checkpoint stores them
    cuda_graph: bool = True  # on a GPU (tp 1, pp 1): decode steps replay one captured CUDA graph


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def run_generate(args: GenerateArgs) -> int:
    from megatron.core import parallel_state as ps

    from ..runtime.distributed import init_runtime, read_launch_env, shutdown

    # Every check a user can fail comes before the tokenizer, the process groups and the weights.
    check_numbers(args)
    params_dtype = None if args.dtype == "auto" else dtype_from_name(args.dtype)
    check_precision(args.dtype, "--dtype")
    check_output_writable(args.output)
    if not Path(args.input).is_file():
        raise ConfigError(f"--input {args.input} is not a file: give a JSONL file of "
                          '{"prompt": ...} or {"messages": ...} rows')
    load = resolve_checkpoint(args.load, "--load")
    check_apart("--output", args.output, {"--input": args.input, "--load": load})
    checkpoint = read_checkpoint(load)
    if checkpoint.meta.is_reward:
        raise ConfigError(f"--load {load} is a reward model ({checkpoint.meta.architecture}): "
                          "generate needs a causal LM checkpoint")
    # init_runtime checks this too, but only after the tokenizer has loaded
    validate_layout(read_launch_env().world_size, args.tp, args.pp, checkpoint.config, ep=args.ep)
    tokenizer = load_tokenizer(checkpoint, args.tokenizer)
    prompts = load_prompts(args.input, tokenizer)  # every rank: cheap, and errors come early
    limit = checkpoint.config.max_position_embeddings
    for p in prompts:
        if len(p.ids) + args.max_new_tokens > limit:
            raise ConfigError(f"{args.input} row {p.index + 1} has {len(p.ids)} tokens; with "
                              f"--max-new-tokens {args.max_new_tokens} that exceeds the model's "
                              f"{limit} positions: shorten it or lower --max-new-tokens")
    runtime = init_runtime(tp=args.tp, pp=args.pp, seed=args.seed, model=checkpoint.config,
                           ep=args.ep)
    try:
        model, _ = load_model(load, params_dtype=params_dtype)
        model = model.to(runtime.device)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = prompts[dp_rank::dp]
        eos = eos_token_ids(tokenizer, checkpoint)
        pad = pad_id(tokenizer)
        results = []
        start, produced = time.time(), 0
        batches = _batches(mine, prompts, dp, args.batch_size, args.ep)
        for number, (batch, real) in enumerate(batches, start=1):
            ids, mask = left_pad([p.ids for p in batch], pad)
            out = generate(model, ids, mask, continuations=[args.sampling],
                           max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                           vocab_size=checkpoint.config.vocab_size, seed=args.seed,
                           sample_ids=torch.tensor([p.index for p in batch]), pad_token_id=pad,
                           pipeline_micro_batches=args.pipeline_micro_batches,
                           cuda_graph=args.cuda_graph)
            for row, prompt in enumerate(batch[:real]):
                response_ids = out.tokens[row, :int(out.lengths[row])].tolist()
                results.append({
                    "index": prompt.index, "prompt": prompt.text,
                    "response": tokenizer.decode(response_ids, skip_special_tokens=True),
                    "response_ids": response_ids, "finish_reason": out.finish_reason[row],
                })
            produced += int(out.lengths[:real].sum())
            log.info("generate: batch %d/%d on dp rank %d, %.1f tokens/s", number, len(batches),
                     dp_rank, produced / max(time.time() - start, 1e-9))
        writer = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
        gathered = [None] * runtime.world_size if runtime.is_main else None
        dist.gather_object(results if writer else [], gathered, dst=0)
        if runtime.is_main:
            rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            text = "".join(json.dumps({k: v for k, v in r.items() if k != "index"}) + "\n"
                           for r in rows)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.output, text)
            log.info("wrote %d responses to %s", len(rows), args.output)
    finally:
        shutdown()
    return 0


def _batches(mine: list, prompts: list, dp: int, batch_size: int, ep: int) -> list:
    """This rank's batches as (prompts, how many of them are real). With expert parallelism
    every forward is a collective of dp ranks (the MoE layers exchange tokens), so every rank runs
    as many batches of as many rows as the rank with the most prompts: the rest are filled with
    copies of the first prompt, whose outputs are dropped."""
    if ep == 1:
        return [(mine[i:i + batch_size], len(mine[i:i + batch_size]))
                for i in range(0, len(mine), batch_size)]
    most = -(-len(prompts) // dp)  # rank 0's share
    size = max(1, min(batch_size, most))
    out = []
    for i in range(0, most, size):
        real = mine[i:i + size]
        out.append((real + [prompts[0]] * (size - len(real)), len(real)))
    return out


def check_numbers(args: GenerateArgs) -> None:
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be at least 1")
    if args.pipeline_micro_batches < 0:
        raise ConfigError("--pipeline-micro-batches must be >= 0 (0: automatic)")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed {args.seed} must be in [0, 2**63 - 1]")


def check_output_writable(output) -> None:
    """Fail now, not after the whole generation, when --output cannot be written."""
    try:
        _check_output_path(Path(output), str(output))
    except OSError as err:  # stat itself can fail, e.g. on a name that is too long
        raise ConfigError(f"--output {output}: cannot write there ({err.strerror}): choose a "
                          "writable location") from None


def _check_output_path(path: Path, output: str) -> None:
    """Not a directory (nor a device: the final rename would replace it); the nearest existing
    ancestor of its directory (atomic_write_text creates the rest) takes a new file."""
    if output.endswith(os.sep) or path.is_dir():
        raise ConfigError(f"--output {output} is a directory: give a file path, e.g. "
                          f"{path / 'responses.jsonl'}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"--output {output} exists and is not a regular file: give a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--output {output}: {parent} is a file, not a directory: choose "
                          "another output path")
    # A probe named like atomic_write_text's temporary file: catches read-only file systems,
    # permissions and names that are too long.
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"--output {output}: cannot create a file in {parent} "
                          f"({err.strerror}): choose a writable location") from None


def sampling_from_flags(greedy: bool, temperature, top_p, top_k) -> SamplingParams:
    """--greedy, or sampling when any of --temperature / --top-p / --top-k is given (else greedy)."""
    sampling_flags = temperature is not None or top_p is not None or top_k is not None
    if greedy and sampling_flags:
        raise ConfigError("--greedy takes no --temperature / --top-p / --top-k")
    if not sampling_flags:
        return GREEDY
    return SamplingParams(temperature=1.0 if temperature is None else temperature,
                          top_p=1.0 if top_p is None else top_p, top_k=top_k or 0)
