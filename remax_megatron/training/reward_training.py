"""`remax-megatron train-rm`: a reward model trained on preference pairs (data/pairs.py) with the
pairwise loss -log sigmoid(r_chosen - r_rejected), each reward read at the last real token (as
our reward-model scoring and transformers' *ForSequenceClassification read it).

It starts from policy.load: a policy checkpoint (the SFT model, as DeepSpeed-Chat does: its
backbone, the scalar head at zero, so every reward starts at 0 and the loss at log 2) or a reward
model to train further. Its checkpoints are reward-kind checkpoints: `train` loads them as
reward.load, `convert mcore-to-hf` exports them as Hugging Face sequence classifiers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config_io import ConfigError
from ..data.pairs import load_pairs
from ..models.builder import build_chunks, model_chunks
from ..models.checkpoint import CheckpointMeta, load_model, read_checkpoint
from ..models.hf_config import REWARD, HFModelInfo, to_hf_config
from ..models.sharding import load_full_state_dict, seeded_full_weights
from ..ops.padding import right_pad
from .critic import copy_backbone
from .metrics import View, plot_losses
from .policy import Policy, describe_policy
from .supervised import SupervisedRun


def pair_batches(pairs: list, weights: list[float], micro_batch_size: int, pad_id: int,
                 device) -> tuple[list[dict], int]:
    """Pairs as right-padded micro-batches of ``micro_batch_size`` pairs, longest first: rows
    2i and 2i + 1 are pair i's chosen and rejected side; ``last`` [rows] each row's last real
    position, ``weight`` [pairs] 1 (0: a filler)."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i].ids))
    batches = []
    for start in range(0, len(order), micro_batch_size):
        chosen = order[start:start + micro_batch_size]
        sides = [side for i in chosen for side in (pairs[i].chosen, pairs[i].rejected)]
        ids = right_pad(sides, pad_id)
        width = ids.size(1)
        batches.append({
            "input_ids": ids.to(device),
            "position_ids": torch.arange(width).expand(len(sides), width).to(device),
            "last": torch.tensor([len(s) - 1 for s in sides], device=device),
            "weight": torch.tensor([weights[i] for i in chosen], device=device),
        })
    return batches, max(b["input_ids"].size(1) for b in batches)


def progress_line(m: dict, total: int) -> str:
    parts = [f"step {m['step']}/{total}", f"loss {m['loss']:.4f}", f"acc {m['accuracy']:.3f}",
             f"margin {m['margin']:+.3f}", f"gnorm {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}",
             f"{m['time/step']:.1f}s", f"{m['tokens_per_second']:.0f} tok/s"]
    if "eval/accuracy" in m:
        parts.append(f"eval acc {m['eval/accuracy']:.3f}")
    return " | ".join(parts)


def eval_line(step: int, result: dict) -> str:
    return (f"eval at step {step}: loss {result['eval/loss']:.4f}, accuracy "
            f"{result['eval/accuracy']:.3f}, margin {result['eval/margin']:+.3f} "
            f"({result['eval/pairs']} held-out pairs)")


RM_VIEW = View(progress_line, eval_line, plot_losses)


class RewardModelRun(SupervisedRun):
    KIND = "train-rm"
    VIEW = RM_VIEW
    UNIT = "pairs"
    MODEL_NAME = "reward_model"
    STATS = ("pairs", "loss", "correct", "margin", "chosen", "rejected", "processed")

    def describe_model(self) -> Policy:
        p = self.cfg.policy
        ckpt = read_checkpoint(p.load) if p.load is not None else None
        self.start_from_reward = ckpt is not None and ckpt.meta.is_reward
        if self.start_from_reward:
            info = Policy(ckpt.config, ckpt.meta, ckpt.hf_config or to_hf_config(HFModelInfo(
                ckpt.config, ckpt.meta.architecture, ckpt.meta.model_type, True)))
        else:
            policy = describe_policy(self.cfg)
            arch = {t: a for a, t in REWARD.items()}.get(policy.meta.model_type)
            if arch is None:
                raise ConfigError(f"policy.load: a {policy.meta.model_type} model has no reward-"
                                  "model (sequence classifier) form here")
            meta = CheckpointMeta(kind="reward", architecture=arch,
                                  model_type=policy.meta.model_type, dtype=policy.meta.dtype,
                                  vocab_size=policy.config.vocab_size,
                                  source=f"reward model from {p.load or 'a random init'}")
            info = Policy(policy.config, meta,
                          to_hf_config(HFModelInfo(policy.config, arch, meta.model_type, True)))
        if info.config.is_moe:
            raise ConfigError("train-rm: mixture-of-experts reward models are not supported: "
                              "start from a dense policy or reward model")
        return info

    def build_model(self) -> list:
        p, vpp = self.cfg.policy, self.cfg.parallel.virtual_pp
        options = dict(recompute=self.cfg.train.recompute)
        if self.start_from_reward:
            chunks = model_chunks(load_model(p.load, expect_kind="reward", virtual_pp=vpp,
                                             **options)[0])
        else:
            chunks = build_chunks(self.trained.config, vpp, reward=True,
                                  perform_initialization=False, **options)
            if p.load is not None:
                policy = model_chunks(load_model(p.load, virtual_pp=vpp)[0])
                for mine, theirs in zip(chunks, policy, strict=True):
                    copy_backbone(theirs, mine)
            else:
                for chunk in chunks:
                    load_full_state_dict(chunk, seeded_full_weights(chunk, self.cfg.train.seed))
        return [self._precision(chunk) for chunk in chunks]

    def load(self, path) -> list:
        return load_pairs(path, self.tokenizer)

    def micro_batches(self, rows, weights):
        return pair_batches(rows, weights, self.cfg.train.micro_batch_size, self.pad, self.device)

    def loss_terms(self, output, batch):
        rows = torch.arange(output.size(0), device=output.device)
        scores = output[rows, batch["last"]].float()
        chosen, rejected = scores[0::2], scores[1::2]
        weight = batch["weight"]
        diff = chosen - rejected
        loss = (-F.logsigmoid(diff) * weight).sum()
        d = diff.detach()
        # a tie counts half: a zero head (the start) is at chance, 0.5
        correct = (d > 0).float() + 0.5 * (d == 0).float()
        stats = torch.stack([weight.sum(), loss.detach(), (correct * weight).sum(),
                             (d * weight).sum(), (chosen.detach() * weight).sum(),
                             (rejected.detach() * weight).sum(), weight.new_zeros(())])
        return loss, weight.sum(), stats

    def tokens_in(self, pair) -> int:
        return len(pair.chosen) + len(pair.rejected)

    def describe(self, sums: dict) -> dict:
        pairs = max(sums["pairs"], 1.0)
        return {"loss": sums["loss"] / pairs, "accuracy": sums["correct"] / pairs,
                "margin": sums["margin"] / pairs, "reward/chosen": sums["chosen"] / pairs,
                "reward/rejected": sums["rejected"] / pairs}
