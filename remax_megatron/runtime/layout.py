"""Parallel layout (tp x pp x dp, and ep: experts split over ep of the dp ranks) and its validation, before anything is built.

Pure functions: no torch.distributed, no megatron. Every failure is one line that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config_io import ConfigError

if TYPE_CHECKING:
    from ..models.config import ModelConfig


class LayoutError(ConfigError):
    """A tp/pp/dp layout that cannot hold the job."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def __str__(self) -> str:
        ep = f" ep={self.ep}" if self.ep > 1 else ""
        return f"tp={self.tp} pp={self.pp} dp={self.dp}{ep} (world size {self.world_size})"


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def validate_layout(world_size: int, tp: int, pp: int, model: "ModelConfig | None" = None,
                    what: str = "model", keys: tuple[str, str] = ("tp", "pp"),
                    ep: int = 1) -> ParallelLayout:
    """Check that ``tp`` x ``pp`` (and expert parallelism ``ep``) fits ``world_size`` and, when
    given, the model's shape. ``keys``: the settings' names as the user wrote them (e.g.
    reward.tp, reward.pp)."""
    for name, value in ((keys[0], tp), (keys[1], pp), ("ep", ep), ("world size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LayoutError(f"{name} must be a positive integer, got {value!r}")
    if world_size % (tp * pp):
        both = f"{keys[0]}*{keys[1]}"
        raise LayoutError(
            f"world size {world_size} is not divisible by {both}={tp}*{pp}={tp * pp}: "
            f"launch a multiple of {tp * pp} ranks or choose {both} among {_divisors(world_size)}"
        )
    dp = world_size // (tp * pp)
    if dp % ep:
        # megatron splits each expert-parallel group out of the data-parallel ranks
        raise LayoutError(f"ep={ep} does not divide the data-parallel size dp={dp} (world size "
                          f"{world_size} / ({keys[0]}*{keys[1]}={tp * pp})): choose ep among "
                          f"{_divisors(dp)} or launch more ranks")
    if ep > 1 and model is not None and not model.is_moe:
        raise LayoutError(f"ep={ep} needs a mixture-of-experts {what}: set ep=1")
    if model is not None and model.is_moe and model.num_experts % ep:
        raise LayoutError(f"{what} has {model.num_experts} experts, not divisible by ep={ep}: "
                          f"choose ep among {_divisors(model.num_experts)}")
    if model is not None:
        heads, groups = model.num_attention_heads, model.num_query_groups
        if heads % tp:
            raise LayoutError(
                f"{what} has {heads} attention heads, not divisible by tp={tp}: "
                f"choose tp among {_divisors(heads)}"
            )
        if groups % tp:
            raise LayoutError(
                f"{what} has {groups} key/value heads, not divisible by tp={tp}: "
                f"choose tp among {_divisors(groups)}"
            )
        if model.num_layers % pp:
            raise LayoutError(
                f"{what} has {model.num_layers} layers, not divisible by pp={pp}: "
                f"choose pp among {_divisors(model.num_layers)}"
            )
        ffn = ("moe_ffn_hidden_size", model.expert_ffn_hidden_size) if model.is_moe else (
            "ffn_hidden_size", model.ffn_hidden_size)
        if ffn[1] % tp:
            raise LayoutError(
                f"{what} {ffn[0]}={ffn[1]} is not divisible by tp={tp}: "
                f"choose tp among {_divisors(ffn[1])}"
            )
    return ParallelLayout(world_size=world_size, tp=tp, pp=pp, ep=ep)
