"""The prompt stream for training: over-length prompts dropped (and counted), a seeded shuffle per
epoch, global batches that wrap across epochs, and disjoint shares per data-parallel rank.

Its whole state is (epoch, cursor), so a resumed run continues with exactly the next prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config_io import ConfigError
from ..seeds import mix_seed
from .prompts import Prompt

log = logging.getLogger(__name__)


@dataclass
class LoaderState:
    epoch: int = 0
    cursor: int = 0  # prompts of this epoch already handed out


class PromptLoader:
    def __init__(self, prompts: list[Prompt], max_prompt_length: int, global_batch_size: int,
                 seed: int, shuffle: bool = True, what: str = "prompts",
                 limit: str = "data.max_prompt_length"):
        """``prompts``: anything with token ``ids`` (SFT rows and preference pairs too, named
        ``what``), those longer than ``max_prompt_length`` (the setting ``limit``) dropped."""
        self.prompts = [p for p in prompts if len(p.ids) <= max_prompt_length]
        self.dropped = len(prompts) - len(self.prompts)
        if self.dropped:
            log.warning("dropped %d of %d %s longer than %s=%d tokens",
                        self.dropped, len(prompts), what, limit, max_prompt_length)
        if len(self.prompts) < global_batch_size:
            raise ConfigError(
                f"only {len(self.prompts)} {what} fit {limit}={max_prompt_length}, "
                f"fewer than train.global_batch_size={global_batch_size}: add {what} or lower "
                "the batch size")
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.state = LoaderState()

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.prompts)))
        g = torch.Generator().manual_seed(mix_seed(self.seed, "data order", epoch))
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def steps_per_epoch(self) -> int:
        return len(self.prompts) // self.global_batch_size

    def next_batch(self) -> list[tuple[int, Prompt]]:
        """The next global batch (all dp ranks' prompts), continuing into the next epoch, as
        (sample id, prompt): the id is unique over epochs, so a prompt met twice in one batch
        (an epoch boundary) is sampled independently each time."""
        batch = []
        while len(batch) < self.global_batch_size:
            order = self._order(self.state.epoch)
            take = min(self.global_batch_size - len(batch), len(order) - self.state.cursor)
            base = self.state.epoch * len(order)
            batch += [(base + i, self.prompts[i])
                      for i in order[self.state.cursor:self.state.cursor + take]]
            self.state.cursor += take
            if self.state.cursor == len(order):
                self.state = LoaderState(self.state.epoch + 1, 0)
        return batch


def share_of(batch: list, dp_rank: int, dp: int) -> list:
    """This data-parallel rank's disjoint share of a global batch."""
    return batch[dp_rank::dp]


def held_out(rows: list, limit: int, path, what: str, limit_name: str) -> list:
    """The held-out rows (anything with ``ids``) that fit ``limit``; those longer are dropped
    like training's, with a line; none fitting is an error."""
    kept = [row for row in rows if len(row.ids) <= limit]
    if not kept:
        raise ConfigError(f"data.eval_path={path}: none of its {len(rows)} {what} fits "
                          f"{limit_name}={limit}")
    if len(kept) < len(rows):
        log.warning("data.eval_path: dropped %d of %d %s longer than %s", len(rows) - len(kept),
                    len(rows), what, limit_name)
    return kept
