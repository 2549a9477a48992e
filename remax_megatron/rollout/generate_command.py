"""`remax-megatron generate`: JSONL prompts in, JSONL responses out, as one process or under
torchrun (tp x pp x dp; each data-parallel rank takes every dp-th prompt)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config_io import ConfigError, atomic_write_text
from ..data.prompts import load_prompts
from ..data.tokenizer import eos_token_ids, load_tokenizer
from ..models.checkpoint import load_model, read_checkpoint
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
    seed: int = 0
    batch_size: int = 16
    tokenizer: str | None = None
    pipeline_micro_batches: int = 0


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

    from ..runtime.distributed import init_runtime, shutdown

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--max-new-tokens and --batch-size must be at least 1")
    if args.pipeline_micro_batches < 0:
        raise ConfigError("--pipeline-micro-batches must be >= 0 (0: automatic)")
    checkpoint = read_checkpoint(args.load)
    tokenizer = load_tokenizer(checkpoint, args.tokenizer)
    prompts = load_prompts(args.input, tokenizer)  # every rank: cheap, and errors come early
    limit = checkpoint.config.max_position_embeddings
    for p in prompts:
        if len(p.ids) + args.max_new_tokens > limit:
            raise ConfigError(f"{args.input} row {p.index + 1} has {len(p.ids)} tokens; with "
                              f"--max-new-tokens {args.max_new_tokens} that exceeds the model's "
                              f"{limit} positions: shorten it or lower --max-new-tokens")
    runtime = init_runtime(tp=args.tp, pp=args.pp, seed=args.seed, model=checkpoint.config)
    try:
        model, _ = load_model(args.load)
        model = model.to(runtime.device)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = prompts[dp_rank::dp]
        eos = eos_token_ids(tokenizer, checkpoint)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        results = []
        start, produced = time.time(), 0
        batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
        for number, batch in enumerate(batches, start=1):
            ids, mask = left_pad([p.ids for p in batch], pad)
            out = generate(model, ids, mask, continuations=[args.sampling],
                           max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                           vocab_size=checkpoint.config.vocab_size, seed=args.seed,
                           sample_ids=torch.tensor([p.index for p in batch]), pad_token_id=pad,
                           pipeline_micro_batches=args.pipeline_micro_batches)
            for row, prompt in enumerate(batch):
                response_ids = out.tokens[row, :int(out.lengths[row])].tolist()
                results.append({
                    "index": prompt.index, "prompt": prompt.text,
                    "response": tokenizer.decode(response_ids, skip_special_tokens=True),
                    "response_ids": response_ids, "finish_reason": out.finish_reason[row],
                })
            produced += int(out.lengths.sum())
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


def sampling_from_flags(greedy: bool, temperature, top_p, top_k) -> SamplingParams:
    """--greedy, or sampling when any of --temperature / --top-p / --top-k is given (else greedy)."""
    sampling_flags = temperature is not None or top_p is not None or top_k is not None
    if greedy and sampling_flags:
        raise ConfigError("--greedy takes no --temperature / --top-p / --top-k")
    if not sampling_flags:
        return GREEDY
    return SamplingParams(temperature=1.0 if temperature is None else temperature,
                          top_p=1.0 if top_p is None else top_p, top_k=top_k or 0)
