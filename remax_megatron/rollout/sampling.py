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

MAX_TEMPERATURE = 100.0  # beyond it every token is as likely as any other: a typo


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit

    def __post_init__(self):
        if not self.greedy and not 0 < self.temperature <= MAX_TEMPERATURE:
            # (0: use greedy; a huge or infinite one turns masked logits into NaN)
            raise ConfigError(f"temperature={self.temperature} must be in (0, "
                              f"{MAX_TEMPERATURE:g}] (for 0 use greedy)")
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


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k then top-p, over ids sorted by descending logit.

    Returns (probs [rows, vocab] in sorted order, sorted ids). The most likely token always stays.
    This is the reference definition (a full stable sort: ties in logit by ascending id);
    ``choose`` reaches the same tokens on CPU without sorting ids (see ``_choose_filtered_cpu``).
    """
    sorted_logits, sorted_ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    return _sorted_filtered_probs(sorted_logits, params), sorted_ids


def _sorted_filtered_probs(sorted_logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, softmax and top-p on logits already sorted in descending order."""
    scaled = sorted_logits / params.temperature
    if params.top_k > 0:
        scaled[..., params.top_k:] = float("-inf")
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    return probs


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    # right=True: the first id whose cumulative mass exceeds the target, never a zero-mass id
    index = torch.searchsorted(cdf, target, right=True).clamp(max=probs.size(-1) - 1)
    return index.squeeze(-1)


def _choose_filtered_cpu(logits: torch.Tensor, params: SamplingParams,
                         uniforms: torch.Tensor) -> torch.Tensor | None:
    """``choose`` for top-k / top-p on CPU: the tokens of the sort-based reference, bit for bit,
    without its cost (torch's stable value+id sort of the whole vocabulary is most of it).

    Why it is exact. The reference's probabilities depend on the sort only through the sorted
    *values*, and that sequence is the same whatever sort produced it (ties are equal values).
    Its normalizer (the softmax sum) is a float sum in sorted order, so it needs the whole sorted
    row: summed in any other order it differs in the last bits, which flips the nucleus boundary
    or the drawn token now and then (measured: ~0.3% of draws at top_p 0.9 over randn*3 logits),
    so no top-k/partial-sort shortcut can be exact for top-p without top-k. Hence:
      1. sort the values only (numpy's sort, SIMD where the CPU has it; no ids carried): the
         same sorted tensor as the reference, except possibly the sign of zeros, which no step
         below can see (x / t, x - max and exp give equal results for +0 and -0);
      2. run the reference's own arithmetic on it (``_sorted_filtered_probs`` and
         ``_inverse_cdf``, the same kernels on an identical [rows, vocab] tensor, row by row):
         the same probabilities and the same chosen *position* in sorted order;
      3. map the position to its id as the stable sort orders ties: with v the value there and
         g the number of logits > v (a binary search in the sorted row), the token is the
         (position - g)-th smallest id among those whose logit == v. Integer logic, exact.
    So the probabilities are bit-identical to the reference's and the tokens identical, on any
    CPU, with no assumption about how a kernel sums. A batch with NaN logits (which the two sorts
    place differently) returns None and the caller uses the reference; so do other devices.
    """
    x = logits.detach().float()
    neg = torch.neg(x).contiguous()  # a fresh tensor: sorted ascending, it is -(values descending)
    neg.numpy().sort(axis=-1)  # in place; NaN last
    if neg.size(0) and bool(neg[:, -1].isnan().any()):
        return None
    probs = _sorted_filtered_probs(torch.neg(neg), params)
    position = _inverse_cdf(probs, uniforms)
    neg_value = neg.gather(-1, position.unsqueeze(-1))
    greater = torch.searchsorted(neg, neg_value).squeeze(-1)  # how many logits exceed the value
    rank_among_equal = position - greater
    equal = x == torch.neg(neg_value)
    ids = equal.view(torch.uint8).argmax(-1)  # the smallest id with that value (first maximum)
    inside = torch.nonzero(rank_among_equal > 0).flatten()  # rows whose draw fell inside a tie
    if inside.numel():
        seen = equal[inside].cumsum(-1)  # equal ids up to and including each id
        nth = seen > rank_among_equal[inside].unsqueeze(-1)
        ids[inside] = nth.view(torch.uint8).argmax(-1)
    return ids


def choose(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token ids [rows] for rows sharing ``params``; ``uniforms`` [rows] in [0, 1) when sampling."""
    if params.greedy:
        return logits.argmax(dim=-1)
    if params.filtered:
        if logits.device.type == "cpu" and logits.dim() == 2:
            chosen = _choose_filtered_cpu(logits, params, uniforms)
            if chosen is not None:
                return chosen
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
