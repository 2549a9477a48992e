"""Token choice on constructed distributions: top-k / top-p never leave their allowed set,
top-k 1 is greedy, sampled frequencies follow the probabilities, draws are seeded, padded vocab
ids are never produced."""

import math

import pytest
import torch

from remax_megatron.config_io import ConfigError
from remax_megatron.rollout.sampling import (
    GREEDY, SamplingParams, allowed_set, choose, filtered_probs, mask_vocab_padding, row_generator,
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


def test_padded_vocab_is_never_produced():
    logits = torch.zeros(1000, 8)
    logits[:, 6:] = 50.0  # padded ids with huge logits
    masked = mask_vocab_padding(logits, 6)
    for params in (GREEDY, SamplingParams(), SamplingParams(top_p=0.9), SamplingParams(top_k=7)):
        tokens = choose(masked, params, torch.rand(1000))
        assert int(tokens.max()) < 6


@pytest.mark.parametrize("kw,needle", [
    (dict(temperature=0.0), "temperature=0.0 must be > 0"),
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
