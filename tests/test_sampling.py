"""Token choice on constructed distributions: top-k / top-p never leave their allowed set,
top-k 1 is greedy, sampled frequencies follow the probabilities, draws are seeded, padded vocab
ids are never produced."""

import math

import pytest
import torch

from remax_megatron.config_io import ConfigError
from remax_megatron.rollout.sampling import (
    GREEDY, SamplingParams, allowed_set, choose, filtered_probs, row_generator,
    row_uniforms,
)

# probabilities 0.4, 0.3, 0.15, 0.1, 0.05 (in a shuffled id order)
PROBS = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = PROBS.log().unsqueeze(0)


def draw(params, n=4000, logits=LOGITS, seed=0):
    g = row_generator(seed, 0)
    u = torch.rand(n, generator=g)
    return choose(logits.expand(n, -1), params, u)


def test_top_k_keeps_the_k_most_likely():
    ids = set(draw(SamplingParams(top_k=2)).tolist())
    assert ids == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.4 + 0.3 = 0.7 < 0.75, so the third (0.15, id 4) is needed; 0.05 and 0.1 are out.
    ids = set(draw(SamplingParams(top_p=0.75)).tolist())
    assert ids == {1, 3, 4}
    assert set(draw(SamplingParams(top_p=0.3)).tolist()) == {1}  # the top token always stays


def test_top_k_and_top_p_together_renormalize():
    probs, ids = filtered_probs(LOGITS, SamplingParams(top_k=3, top_p=0.6))
    kept = probs[0] / probs[0].sum()
    assert ids[0, :2].tolist() == [1, 3]
    torch.testing.assert_close(kept[:2], torch.tensor([0.4, 0.3]) / 0.7)
    assert kept[2:].sum() == 0
    allowed = allowed_set(LOGITS, SamplingParams(top_k=3, top_p=0.6))
    assert allowed[0].tolist() == [False, True, False, True, False]


def test_top_k_one_is_greedy_and_greedy_is_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    u = torch.rand(64)
    assert torch.equal(choose(logits, SamplingParams(top_k=1), u), logits.argmax(-1))
    assert torch.equal(choose(logits, GREEDY, None), logits.argmax(-1))


def test_frequencies_follow_probabilities_with_temperature():
    counts = torch.bincount(draw(SamplingParams(temperature=1.0), n=20000), minlength=5).float()
    torch.testing.assert_close(counts / counts.sum(), PROBS, atol=0.015, rtol=0)
    # temperature 2 flattens: p ~ sqrt(PROBS)
    hot = torch.bincount(draw(SamplingParams(temperature=2.0), n=20000), minlength=5).float()
    want = PROBS.sqrt() / PROBS.sqrt().sum()
    torch.testing.assert_close(hot / hot.sum(), want, atol=0.015, rtol=0)


def test_seeded_and_independent_streams():
    a = draw(SamplingParams(), n=50, seed=7)
    assert torch.equal(a, draw(SamplingParams(), n=50, seed=7))
    assert not torch.equal(a, draw(SamplingParams(), n=50, seed=8))
    assert torch.rand(3, generator=row_generator(1, 2, 0)).tolist() != \
        torch.rand(3, generator=row_generator(1, 2, 1)).tolist()


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Ids at or beyond the true vocab size at -inf (where the engine's logits end instead)."""
    logits = logits.clone()
    logits[..., vocab_size:] = float("-inf")
    return logits


def test_ids_without_probability_are_never_produced():
    logits = torch.zeros(1000, 8)
    logits[:, 6:] = 50.0  # padded ids with huge logits
    masked = mask_vocab_padding(logits, 6)
    for params in (GREEDY, SamplingParams(), SamplingParams(top_p=0.9), SamplingParams(top_k=7)):
        tokens = choose(masked, params, torch.rand(1000))
        assert int(tokens.max()) < 6


@pytest.mark.parametrize("kw,needle", [
    (dict(temperature=0.0), "temperature=0.0 must be in (0, 100] (for 0 use greedy)"),
    (dict(temperature=float("inf")), "temperature=inf must be in (0, 100]"),
    (dict(temperature=1e30), "temperature=1e+30 must be in (0, 100]"),
    (dict(temperature=float("nan")), "temperature=nan must be in (0, 100]"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
])
def test_bad_parameters(kw, needle):
    with pytest.raises(ConfigError) as err:
        SamplingParams(**kw)
    assert needle in str(err.value)


def test_inverse_cdf_by_hand():
    logits = torch.tensor([[math.log(0.25), math.log(0.75)]])
    params = SamplingParams()
    assert choose(logits, params, torch.tensor([0.2])).item() == 0
    assert choose(logits, params, torch.tensor([0.3])).item() == 1


def test_bulk_row_uniforms_equal_one_draw_per_step():
    """The engine draws each row's uniforms for all steps at once; the numbers must be those of
    one draw per step, so sampled tokens do not depend on how the draws are batched."""
    seed, ids, streams, steps = 7, [3, 3, 9, 9], [None, 0, None, 0], 300
    table = row_uniforms(seed, ids, streams, steps)
    for row, (sample_id, stream) in enumerate(zip(ids, streams)):
        if stream is None:
            assert not table[row].any()
            continue
        g = row_generator(seed, sample_id, stream)
        one_by_one = torch.stack([torch.rand((), generator=g) for _ in range(steps)])
        assert torch.equal(table[row], one_by_one)
    assert not torch.equal(table[1], table[3])  # different prompts, different draws


# --- choose() on CPU (a values-only sort, no id sort) against the implementation it replaced -----
# An independent copy of choose() as it was before (a full stable value+id sort of every row):
# the new code must pick exactly the same token for the same uniform, always.

def _ref_filtered_probs(logits, params):
    sorted_logits, sorted_ids = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    scaled = sorted_logits / params.temperature
    if params.top_k > 0:
        scaled[..., params.top_k:] = float("-inf")
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        probs = probs.masked_fill(before >= params.top_p, 0.0)
    return probs, sorted_ids


def _ref_inverse_cdf(probs, uniforms):
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]
    index = torch.searchsorted(cdf, target, right=True).clamp(max=probs.size(-1) - 1)
    return index.squeeze(-1)


def ref_choose(logits, params, uniforms):
    if params.greedy:
        return logits.argmax(dim=-1)
    if params.filtered:
        probs, sorted_ids = _ref_filtered_probs(logits, params)
        return sorted_ids.gather(-1, _ref_inverse_cdf(probs, uniforms).unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    return _ref_inverse_cdf(probs, uniforms)


def ties_by_descending_id(logits, params, uniforms):
    """A deliberately wrong variant (the same probabilities, equal logits ordered by descending
    id, as an unstable sort may do): the comparison must catch it."""
    return logits.size(-1) - 1 - ref_choose(logits.flip(-1), params, uniforms)


KINDS = ("model", "peaked", "flat", "ties", "constant", "bf16", "padded")


def kind_logits(kind, rows, vocab, g):
    """[rows, vocab] logits of one kind: like a model's (randn * 3), peaked, very flat (a nucleus
    of most of the vocabulary), exact ties everywhere (incl. at the nucleus boundary), all equal,
    bf16 (many ties), and megatron's padded vocabulary (-inf beyond the true size)."""
    z = torch.randn(rows, vocab, generator=g)
    if kind == "model":
        return z * 3
    if kind == "peaked":
        return z * 12
    if kind == "flat":
        return z * 1e-3
    if kind == "ties":
        return (z * 2).round() / 2
    if kind == "constant":
        return torch.zeros(rows, vocab)
    if kind == "bf16":
        return (z * 3).bfloat16()
    if kind == "padded":
        return mask_vocab_padding(z * 3, max(1, vocab - max(1, vocab // 10)))
    raise ValueError(kind)


def uniforms_for(rows, g):
    """Uniforms in [0, 1): the extremes, ones near 0 and near 1, and plain ones."""
    u = torch.rand(rows, generator=g)
    near0 = torch.rand(rows, generator=g) * 1e-6
    near1 = (1 - torch.rand(rows, generator=g) * 1e-6).clamp(max=1 - 2 ** -24)
    which = torch.randint(0, 3, (rows,), generator=g)
    u = torch.where(which == 0, near0, torch.where(which == 1, near1, u))
    special = torch.tensor([0.0, 2 ** -24, 0.5, 1 - 2 ** -24, 1 - 2 ** -23, 2 ** -23])
    u[:min(rows, special.numel())] = special[:rows]
    return u


TOP_PS = (0.1, 0.5, 0.9, 0.99, 1.0)
TOP_KS = (0, 1, 5, 50)


def assert_same_tokens(logits, params, u, what=""):
    got, want = choose(logits, params, u), ref_choose(logits, params, u)
    bad = torch.nonzero(got != want).flatten().tolist()
    assert not bad, f"{what} {params}: rows {bad[:5]} chose {got[bad[:5]].tolist()}, " \
                    f"the sort-based reference {want[bad[:5]].tolist()}"


@pytest.mark.parametrize("vocab", [1, 2, 7, 64, 1000])
def test_choose_matches_the_sort_based_reference(vocab):
    g = torch.Generator().manual_seed(vocab)
    for top_p in TOP_PS:
        for top_k in TOP_KS:
            for temperature in (0.3, 1.0, 1.7):
                params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
                logits = torch.cat([kind_logits(kind, 16, vocab, g).float() for kind in KINDS])
                u = uniforms_for(logits.size(0), g)
                assert_same_tokens(logits, params, u, f"vocab {vocab}")
                bf16 = kind_logits("bf16", 16, vocab, g)
                assert_same_tokens(bf16, params, uniforms_for(16, g), f"bf16 vocab {vocab}")


@pytest.mark.parametrize("top_p", TOP_PS)
def test_choose_matches_the_sort_based_reference_gpt2_vocab(top_p):
    vocab, g = 50257, torch.Generator().manual_seed(int(top_p * 100))
    for i, top_k in enumerate(TOP_KS):
        params = SamplingParams(temperature=(0.7, 1.0, 1.3, 0.9)[i], top_p=top_p, top_k=top_k)
        logits = torch.cat([kind_logits(kind, 2, vocab, g).float() for kind in KINDS])
        assert_same_tokens(logits, params, uniforms_for(logits.size(0), g), "gpt2 vocab")
        bf16 = kind_logits("bf16", 4, vocab, g)
        assert_same_tokens(bf16, params, uniforms_for(4, g), "gpt2 vocab bf16")


def test_ties_at_the_nucleus_boundary_keep_the_lowest_ids():
    # four tied most likely tokens (ids 1, 2, 4, 6), p ~ 0.238 each: top_p 0.3 keeps two of
    # them, the two lowest ids, as the stable sort orders them
    logits = torch.tensor([[0.0, 3.0, 3.0, 0.0, 3.0, 0.0, 3.0, 0.0]]).expand(2000, -1)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(top_p=0.3)
    assert set(choose(logits, params, u).tolist()) == {1, 2}
    assert_same_tokens(logits, params, u)
    assert set(choose(logits, SamplingParams(top_k=3), u).tolist()) == {1, 2, 4}


def test_the_comparison_catches_a_wrong_tie_order():
    """The reference comparison can fail: the same probabilities with ties ordered the other
    way are caught (so an unstable order of equal logits would be)."""
    g = torch.Generator().manual_seed(3)
    wrong = 0
    for kind in ("ties", "bf16", "constant"):
        logits = kind_logits(kind, 64, 1000, g)
        u = uniforms_for(64, g)
        for params in (SamplingParams(top_p=0.9), SamplingParams(top_k=50, top_p=0.5)):
            flipped = ties_by_descending_id(logits, params, u)
            wrong += int((flipped != ref_choose(logits, params, u)).sum())
    assert wrong > 0


def test_strided_rows_empty_batches_and_uniform_one():
    g = torch.Generator().manual_seed(5)
    logits = kind_logits("ties", 12, 300, g)
    params = SamplingParams(top_p=0.8, temperature=0.8)
    u = uniforms_for(12, g)
    for c in range(3):  # the engine hands each continuation the rows c, c+k, ...
        assert_same_tokens(logits[c::3], params, u[c::3], "strided")
    assert choose(logits[:0], params, u[:0]).shape == (0,)
    # u = 1.0 is outside [0, 1), but the reference's clamp then returns the last id in sorted
    # order (the smallest logit, the largest id among ties): kept as it was
    for kind in ("ties", "padded", "constant"):
        rows = kind_logits(kind, 4, 300, g)
        for params in (SamplingParams(top_k=1), SamplingParams(top_p=0.5),
                       SamplingParams(top_k=5, top_p=0.9)):
            assert_same_tokens(rows, params, torch.ones(4), f"u=1 {kind}")


def test_nan_logits_fall_back_to_the_reference():
    g = torch.Generator().manual_seed(6)
    logits = kind_logits("model", 6, 500, g)
    logits[2, 17] = float("nan")
    logits[4] = float("nan")
    for params in (SamplingParams(top_p=0.9), SamplingParams(top_k=5)):
        u = uniforms_for(6, g)
        assert torch.equal(choose(logits, params, u), ref_choose(logits, params, u))
