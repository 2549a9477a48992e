"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p together.

Pure functions on [rows, vocab] logits. Sampling is inverse-CDF with one uniform number per row,
drawn from that row's own generator (seeded by the run seed and the row's sample id), so a row's
tokens do not depend on which other rows share its batch, on the data-parallel split or on the
tensor/pipeline layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config_io import ConfigError
from ..seeds import mix_seed


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0 (use greedy instead)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 means no limit)")

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_p < 1 or self.top_k > 0)


GREEDY = SamplingParams(greedy=True)


def row_generator(seed: int, sample_id: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one row: the same (seed, sample_id, stream) always gives the same draws."""
    return torch.Generator().manual_seed(mix_seed(seed, sample_id, stream))


def row_uniforms(seed: int, sample_ids: list[int], streams: list, steps: int) -> torch.Tensor:
    """[R, steps] uniforms, row r from row_generator(seed, sample_ids[r], streams[r]) (zeros
    where the stream is None: greedy rows draw nothing). Drawn in bulk, one call per row: the
    same numbers as one draw per step (the generator's stream does not depend on the call size)."""
    out = torch.zeros(len(sample_ids), steps)
    for row, (sample_id, stream) in enumerate(zip(sample_ids, streams)):
        if stream is not None:
            out[row] = torch.rand(steps, generator=row_generator(seed, sample_id, stream))
    return out


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Ids at or beyond the true vocab size (megatron's padding) can never be chosen."""
    if logits.size(-1) > vocab_size:
        logits = logits.clone()
        logits[..., vocab_size:] = float("-inf")
    return logits


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k then top-p, over ids sorted by descending logit.

    Returns (probs [rows, vocab] in sorted order, sorted ids). The most likely token always stays.
    """
    sorted_logits, sorted_ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    scaled = sorted_logits / params.temperature
    if params.top_k > 0:
        scaled[..., params.top_k:] = float("-inf")
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    return probs, sorted_ids


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    # right=True: the first id whose cumulative mass exceeds the target, never a zero-mass id
    index = torch.searchsorted(cdf, target, right=True).clamp(max=probs.size(-1) - 1)
    return index.squeeze(-1)


def choose(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token ids [rows] for rows sharing ``params``; ``uniforms`` [rows] in [0, 1) when sampling."""
    if params.greedy:
        return logits.argmax(dim=-1)
    if params.filtered:
        probs, sorted_ids = filtered_probs(logits, params)
        return sorted_ids.gather(-1, _inverse_cdf(probs, uniforms).unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    return _inverse_cdf(probs, uniforms)


def allowed_set(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Boolean [rows, vocab]: the ids ``choose`` can return (for tests and diagnostics)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).bool()
    probs, sorted_ids = filtered_probs(logits, params)
    allowed = torch.zeros_like(probs, dtype=torch.bool)
    return allowed.scatter(-1, sorted_ids, probs > 0)
