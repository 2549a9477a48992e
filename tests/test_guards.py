"""A run whose every update is skipped stops with one line after train.max_skipped_steps steps
in a row (hand-made sequences of skipped / total updates per step)."""

import pytest

from remax_megatron.config_io import ConfigError
from remax_megatron.training.guards import SkippedSteps


def feed(limit: int, steps: list[tuple[int, int]]) -> int:
    """The step at which the guard stops (0: it never does)."""
    guard = SkippedSteps(limit)
    for step, (skipped, updates) in enumerate(steps, start=1):
        try:
            guard.after_step(step, skipped, updates)
        except ConfigError as err:
            assert "\n" not in str(err)
            return step
    return 0


def test_stops_after_the_limit_in_a_row():
    assert feed(3, [(0, 1), (1, 1), (1, 1), (1, 1), (1, 1)]) == 4


def test_a_step_with_any_applied_update_starts_the_count_again():
    # step 3 applied one of its two updates; steps 4-6 are the three in a row
    assert feed(3, [(1, 1), (2, 2), (1, 2), (2, 2), (2, 2), (2, 2)]) == 6
    assert feed(3, [(1, 1), (1, 1), (0, 1), (1, 1), (1, 1)]) == 0


def test_zero_never_stops():
    assert feed(0, [(1, 1)] * 20) == 0


def test_the_line_names_the_steps_and_the_way_out():
    guard = SkippedSteps(2)
    guard.after_step(7, 0, 1)
    guard.after_step(8, 1, 1)
    with pytest.raises(ConfigError, match=r"^steps 8-9: every update skipped .* have not changed "
                       r"since step 7: lower train.lr.*train.max_skipped_steps=0"):
        guard.after_step(9, 1, 1)
