"""Rewards: a rule function, or a reward model on its own tensor/pipeline-parallel groups."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Scored:
    """One rollout to score: the prompt and a response, as text and as policy token ids."""

    uid: int  # unique over the whole world in this step
    prompt_text: str
    response_text: str
    prompt_ids: list
    response_ids: list
    ended_with_eos: bool


class Reward:
    """``score`` is called by every rank with its own rollouts; returns [len(items)] rewards."""

    collective = False  # True: every rank must call score together (a reward model)

    def score(self, items: list[Scored]) -> torch.Tensor:
        raise NotImplementedError
