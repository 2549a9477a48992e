"""mix_seed: the one seed derivation (weights, data order, sampling)."""

from remax_megatron.seeds import mix_seed


def test_mix_seed_is_stable_distinct_and_in_range():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    seeds = {mix_seed(a, b) for a in range(30) for b in range(30)}
    assert len(seeds) == 900  # no collisions, and (a, b) != (b, a)
    assert mix_seed(1, "2") != mix_seed(1, 2)  # names and numbers are different parts
    assert mix_seed(12, 3) != mix_seed(1, 23)  # not a digit concatenation
    assert all(0 <= s < 2**63 for s in seeds)
