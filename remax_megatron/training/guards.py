"""Stop a run that has stopped learning instead of letting it run to the end and save it."""

from __future__ import annotations

from ..config_io import ConfigError


class SkippedSteps:
    """Counts steps in a row whose every policy update was skipped (a non-finite loss or
    gradient: megatron's optimizer leaves the weights as they were). ``limit`` such steps in a
    row raise one line; 0 never does (fp16 runs: their loss scaler skips updates while it
    searches for its scale)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.first = None  # the first step of the current run of skipped steps

    def after_step(self, step: int, skipped: int, updates: int) -> None:
        if skipped < updates or updates == 0:
            self.first = None
            return
        if self.first is None:
            self.first = step
        if self.limit and step - self.first + 1 >= self.limit:
            raise ConfigError(
                f"steps {self.first}-{step}: every update skipped (a non-finite loss or "
                f"gradient, see the warnings above), so the weights have not changed since step "
                f"{self.first - 1}: lower train.lr, check the rewards and the data, or set "
                "train.max_skipped_steps=0 to go on")
