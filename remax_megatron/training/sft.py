"""`remax-megatron sft`: supervised fine-tuning of a policy on prompt/response or chat rows
(data/sft.py). The loss is the mean negative log-likelihood of the trained (response) tokens over
the whole global batch, prompts and padding masked; the checkpoints are policy checkpoints that
`train` loads (policy.load) and `convert mcore-to-hf` exports."""

from __future__ import annotations

import math

import torch

from ..data.sft import load_sft
from ..models.builder import sequence_multiple
from ..ops.logprobs import frame_log_probs
from ..ops.padding import right_pad
from .metrics import View, plot_losses
from .policy import describe_policy
from .supervised import SupervisedRun


def sft_batches(rows: list, weights: list[float], micro_batch_size: int, pad_id: int, device,
                width_multiple: int = 1) -> tuple[list[dict], int]:
    """Rows (Examples: ``ids``, ``trained``) as right-padded micro-batches, longest first (each
    as wide as its longest row, rounded up to ``width_multiple``). ``loss_mask`` marks the
    trained tokens in the next-token frame (position t predicts token t + 1) times the row's
    weight (0: a filler), ``logit_positions`` where the output layer runs (engine.py)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    batches = []
    for start in range(0, len(order), micro_batch_size):
        chosen = order[start:start + micro_batch_size]
        width = max(len(rows[i].ids) for i in chosen)
        width = -(-width // width_multiple) * width_multiple
        ids = right_pad([rows[i].ids for i in chosen], pad_id, width)
        trained = right_pad([rows[i].trained[1:] for i in chosen], 0, width - 1).float()
        weight = torch.tensor([weights[i] for i in chosen])[:, None]
        batches.append({
            "input_ids": ids.to(device),
            "position_ids": torch.arange(width).expand(len(chosen), width).to(device),
            "loss_mask": (trained * weight).to(device),
            # a filler's positions too: never an empty selection (a micro-batch of fillers)
            "logit_positions": trained.nonzero().to(device),
        })
    return batches, max(b["input_ids"].size(1) for b in batches)


def progress_line(m: dict, total: int) -> str:
    parts = [f"step {m['step']}/{total}", f"loss {m['loss']:.4f}",
             f"ppl {m['perplexity']:.2f}", f"gnorm {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}",
             f"{m['time/step']:.1f}s", f"{m['tokens_per_second']:.0f} tok/s"]
    if "eval/loss" in m:
        parts.append(f"eval loss {m['eval/loss']:.4f}")
    return " | ".join(parts)


def eval_line(step: int, result: dict) -> str:
    return (f"eval at step {step}: loss {result['eval/loss']:.4f}, perplexity "
            f"{result['eval/perplexity']:.2f} ({result['eval/rows']} held-out rows, "
            f"{result['eval/tokens']:.0f} response tokens)")


SFT_VIEW = View(progress_line, eval_line, plot_losses)


class SFTRun(SupervisedRun):
    KIND = "sft"
    VIEW = SFT_VIEW
    STATS = ("tokens", "nll", "processed")

    def describe_model(self):
        return describe_policy(self.cfg)

    def load(self, path) -> list:
        return load_sft(path, self.tokenizer)

    def micro_batches(self, rows, weights):
        return sft_batches(rows, weights, self.cfg.train.micro_batch_size, self.pad, self.device,
                           sequence_multiple(self.ddp))

    def loss_terms(self, output, batch):
        mask = batch["loss_mask"]
        nll = -(frame_log_probs(output, batch, self.trained.config.vocab_size) * mask).sum()
        return nll, mask.sum(), torch.stack([mask.sum(), nll.detach(), mask.new_zeros(())])

    def describe(self, sums: dict) -> dict:
        loss = sums["nll"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": sums["tokens"]}
