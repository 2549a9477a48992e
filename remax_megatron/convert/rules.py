"""A family's conversion is a table of rules; both directions and the write order come from it.

A rule maps one megatron-core tensor to the HF tensors it is made of, with the two transforms
between them (identity by default). Rules are applied lazily, one at a time, so a conversion holds
one layer's tensors in flight, never a second copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

Get = Callable[[str], torch.Tensor]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _single(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    to_mcore: Callable[..., torch.Tensor] = _identity  # (*hf tensors) -> mcore tensor
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _single  # inverse


def same(mcore: str, hf: str) -> Rule:
    return Rule(mcore, (hf,))


def transposed(mcore: str, hf: str) -> Rule:
    """HF GPT-2's Conv1D keeps weights as [in, out]; megatron's linears as [out, in]."""
    return Rule(mcore, (hf,), lambda t: t.t(), lambda t: (t.t(),))


def stacked(mcore: str, hf: tuple[str, ...]) -> Rule:
    """Equal-size HF tensors concatenated on dim 0 (e.g. SwiGLU fc1 = [gate; up])."""
    return Rule(mcore, hf, lambda *ts: torch.cat(ts, 0), lambda t: t.chunk(len(hf), 0))


def to_mcore(rules: list[Rule], get: Get) -> Iterator[tuple[str, torch.Tensor]]:
    for rule in rules:
        yield rule.mcore, rule.to_mcore(*(get(name) for name in rule.hf))


def to_hf(rules: list[Rule], get: Get) -> Iterator[tuple[str, torch.Tensor]]:
    for rule in rules:
        parts = rule.to_hf(get(rule.mcore))
        for name, tensor in zip(rule.hf, parts, strict=True):
            yield name, tensor.contiguous()


def hf_names(rules: list[Rule]) -> list[str]:
    """Every HF tensor, in the order ``to_hf`` yields them."""
    return [name for rule in rules for name in rule.hf]


def planned_shapes(family, config, reward: bool) -> dict[str, tuple[int, ...]]:
    """The HF tensors of this model (from the family's rules) with their shapes, in write order."""
    shapes = family.hf_shapes(config, reward)
    return {name: tuple(shapes[name]) for name in hf_names(family.rules(config, reward))}


def head_rules(reward: bool, tied: bool) -> list[Rule]:
    """The output end: a reward model's score head, or an untied LM head (a tied one is the
    embedding and is not stored)."""
    if reward:
        return [same("score_head.weight", "score.weight")]
    if not tied:
        return [same("output_layer.weight", "lm_head.weight")]
    return []
