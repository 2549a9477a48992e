#!/usr/bin/env python
"""The training forward/backward without waste, measured: the trainer's own loss and micro-batches
on a GPT-2-124M-shaped policy (random weights, GPT-2's 50257-id vocabulary), over fixed rollouts
whose responses end at different lengths (as responses ending at EOS do), three ways side by side
in one process:

  full      today's baseline: the output layer and log-softmax at every position, every
            micro-batch as wide as the longest row of the step;
  response  the output layer only at the response positions the loss reads;
  grouped   that, with rows grouped by length into micro-batches each as wide as its own
            longest row.

  python tools/bench_train_step.py [--prompts 16] [--prompt-len 64] [--new-tokens 64]
                                   [--micro-batch 4] [--repeats 3] [--spread eos|full] [--quick]

Prints the padded share of each layout, the median seconds of one forward/backward over the
step's micro-batches, and the ratios against ``full``. The three runs compute the same loss
and gradients (checked here too: the largest gradient difference relative to the largest entry).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--spread", choices=("eos", "full"), default="eos",
                   help="eos: response lengths uniform in [new_tokens / 8, new_tokens] and "
                        "prompt lengths in [prompt_len / 2, prompt_len]; full: every row at "
                        "both limits")
    p.add_argument("--quick", action="store_true", help="a tiny model: a smoke run")
    return p.parse_args(argv)


def model_config(quick: bool) -> dict:
    if quick:
        return {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                "ffn_hidden_size": 256, "vocab_size": 1000, "max_position_embeddings": 256}
    return {"family": "gpt2", "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
            "ffn_hidden_size": 3072, "vocab_size": 50257, "max_position_embeddings": 1024}


def fake_rollout(a, vocab: int, g: torch.Generator):
    """Prompts and one sampled response each, with the spread of lengths asked for."""
    from remax_megatron.data.prompts import Prompt
    from remax_megatron.rollout.engine import GenerationOutput

    n = a.prompts
    if a.spread == "eos":
        prompt_lens = torch.randint(a.prompt_len // 2, a.prompt_len + 1, (n,), generator=g)
        lengths = torch.randint(max(1, a.new_tokens // 8), a.new_tokens + 1, (n,), generator=g)
    else:
        prompt_lens = torch.full((n,), a.prompt_len)
        lengths = torch.full((n,), a.new_tokens)
    mine = [(i, Prompt(i, "", torch.randint(3, vocab, (int(k),), generator=g).tolist()))
            for i, k in enumerate(prompt_lens)]
    tokens = torch.randint(3, vocab, (n, a.new_tokens), generator=g)
    mask = torch.arange(a.new_tokens)[None] < lengths[:, None]
    out = GenerationOutput(tokens=tokens * mask, response_mask=mask, lengths=lengths,
                           finish_reason=["eos"] * n, log_probs=-torch.rand(n, a.new_tokens) * mask,
                           prompt_index=torch.arange(n), continuation=torch.zeros(n))
    return mine, out, torch.randn(n, generator=g)


def main(argv=None) -> int:
    a = parse_args(argv)
    from remax_megatron.logging_utils import setup_logging
    from remax_megatron.training.config import load_config
    from remax_megatron.training.engine import forward_backward
    from remax_megatron.training.experience import RolloutShape, micro_batches
    from remax_megatron.training.trainer import EXPERIENCE_STATS, UPDATE_STATS, Trainer

    setup_logging("WARNING")
    model = model_config(a.quick)
    work = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    cfg = load_config(None, [], base={
        "policy": {"model": model, "builtin_tokenizer": True},
        "reward": {"rule": "remax_megatron.training.demo:vowel_share"},
        "data": {"builtin": True, "max_prompt_length": a.prompt_len},
        "rollout": {"max_new_tokens": a.new_tokens},
        "train": {"steps": 1, "global_batch_size": a.prompts, "micro_batch_size": a.micro_batch},
        "log": {"tensorboard": False, "plot": False},
        "output_dir": str(work / "run"),
    })
    trainer = Trainer(cfg)
    g = torch.Generator().manual_seed(0)
    mine, out, outcome = fake_rollout(a, model["vocab_size"], g)

    def layout(name):
        batches, width = micro_batches(RolloutShape(1, False), mine, out, outcome, trainer.pad,
                                       a.micro_batch, trainer.device, by_length=name == "grouped")
        if name == "full":
            for b in batches:
                del b["logit_positions"]
        return batches, width

    def step(batches, width):
        trainer._experience = torch.zeros(len(EXPERIENCE_STATS), dtype=torch.float64)
        trainer._update_stats = torch.zeros(len(UPDATE_STATS))
        for chunk in trainer.ddp:  # the policy's chunks (one without virtual_pp)
            chunk.train()
        forward_backward(trainer.ddp, batches, trainer._loss, seq_length=width,
                         micro_batch_size=a.micro_batch)
        return torch.cat([b.grad_data.flatten().clone() for chunk in trainer.ddp
                          for b in chunk.buffers])

    names = ("full", "response", "grouped")
    layouts = {name: layout(name) for name in names}
    real = sum(len(p.ids) for _, p in mine) + int(out.lengths.sum())
    grads = {name: step(*layouts[name]) for name in names}  # warm-up, and the gradients
    seconds = {name: [] for name in names}
    for _ in range(a.repeats):  # alternated: load on the machine hits all three alike
        for name in names:
            start = time.perf_counter()
            step(*layouts[name])
            seconds[name].append(time.perf_counter() - start)
    trainer.close()

    scale = grads["full"].abs().max().item()
    print(f"GPT-2-{'tiny' if a.quick else '124M'} shape, {a.prompts} rows, prompts <= "
          f"{a.prompt_len} + responses <= {a.new_tokens} tokens ({a.spread} spread), micro-batch "
          f"{a.micro_batch}, {torch.get_num_threads()} threads, fp32, median of {a.repeats}")
    base = statistics.median(seconds["full"])
    for name in names:
        batches, _ = layouts[name]
        slots = sum(b["input_ids"].numel() for b in batches)
        median = statistics.median(seconds[name])
        diff = (grads[name] - grads["full"]).abs().max().item() / max(scale, 1e-30)
        print(f"{name:9s} padded {1 - real / slots:6.1%}  fwd/bwd {median:7.3f} s  "
              f"ratio vs full {median / base:5.3f}  (time saved {1 - median / base:6.1%})  "
              f"max grad diff {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
