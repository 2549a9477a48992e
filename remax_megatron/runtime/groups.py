"""Process groups for a second model (the reward model) with its own tp/pp over the same ranks.

Ranks are laid out as megatron lays them out (tensor fastest, then data, then pipeline), so a
reward model with the policy's layout gets groups of the same shape. Every rank creates every
group, in the same order (torch.distributed requires it).
"""

from __future__ import annotations

import torch.distributed as dist

from .layout import validate_layout


def _new_groups(lists: list[list[int]], me: int):
    mine = None
    for ranks in lists:
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    return mine


def build_process_groups(tp: int, pp: int, model=None, what: str = "reward model"):
    """A megatron ProcessGroupCollection for a (tp, pp) layout over the whole world."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    world, me = dist.get_world_size(), dist.get_rank()
    dp = validate_layout(world, tp, pp, model, what).dp

    def rank(t, d, p):
        return t + tp * (d + dp * p)

    tp_lists = [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)]
    pp_lists = [[rank(t, d, p) for p in range(pp)] for t in range(tp) for d in range(dp)]
    dp_lists = [[rank(t, d, p) for d in range(dp)] for t in range(tp) for p in range(pp)]
    mp_lists = [[rank(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)]
    embd_lists = [sorted({ranks[0], ranks[-1]}) for ranks in pp_lists]
    first_lists = [[ranks[0]] for ranks in pp_lists]
    single = [[r] for r in range(world)]
    tp_group = _new_groups(tp_lists, me)
    dp_group = _new_groups(dp_lists, me)
    return ProcessGroupCollection(
        tp=tp_group, pp=_new_groups(pp_lists, me), dp=dp_group, dp_cp=dp_group,
        mp=_new_groups(mp_lists, me), embd=_new_groups(embd_lists, me),
        pos_embd=_new_groups(first_lists, me), cp=_new_groups(single, me), tp_cp=tp_group,
    )
