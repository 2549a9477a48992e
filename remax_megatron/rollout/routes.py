"""The experts a mixture-of-experts policy chose for every token of a rollout, and the same choice
in its training forwards: compared there (``moe/routing_mismatch``) or forced on them
(``rollout.routing_replay``: Rollout Routing Replay, arXiv 2510.11370).

A rollout computes its tokens in other shapes than a training forward (the prompt prefilled in
left-padded groups, then one token per step against a KV cache), so float rounding differs, and a
router whose k-th and (k+1)-th expert scores nearly tie may choose differently for the same token:
the trained log-probs then come from another network than the rollout's. Each megatron router has
a ``router_replay`` slot that its top-k goes through; a ``Choice`` there records the top-k it
computes, or hands back a given one (the probabilities are then the router's own scores of the
given experts, as for any choice).

Positions follow training rows: a row is [prompt; response], position p holds token p. The
prompt's choices come from the prefill (shared by every continuation of a prompt); response token
t's from the decode step that fed it. A row's last token is never fed (its output predicts
nothing the loss reads), nor is padding: those positions hold -1, and a replay lets the router
choose for them (their outputs reach no real token).
"""

from __future__ import annotations

import torch

from ..models.builder import model_chunks, unwrap


class Choice:
    """A router's top-k: computed (and passed to ``sink``) or, with ``target``, given (rows of
    -1 in ``target``: computed)."""

    def __init__(self):
        self.target: torch.Tensor | None = None  # [tokens, k] expert ids
        self.sink = None  # callable(indices [tokens, k]) for computed choices

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):
        if self.target is None:
            probs, indices = default_compute_topk(scores, topk, num_groups=num_groups,
                                                  group_topk=group_topk)
            if self.sink is not None:
                self.sink(indices)
            return probs, indices
        target = self.target.to(scores.device)
        _, computed = default_compute_topk(scores, topk, num_groups=num_groups,
                                           group_topk=group_topk)
        indices = torch.where(target < 0, computed, target)
        return scores.gather(1, indices), indices


def routers(model) -> dict[int, object]:
    """This rank's MoE routers by global layer index (0-based), each given a ``Choice``."""
    from megatron.core.transformer.moe.router import TopKRouter

    found = {}
    for chunk in model_chunks(model):
        for layer in unwrap(chunk).decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if isinstance(router, TopKRouter):
                if not isinstance(router.router_replay, Choice):
                    router.router_replay = Choice()
                found[layer.layer_number - 1] = router
    return found


class RolloutRoutes:
    """Records a generation's choices: ``prefill(prompts)`` / ``decode(step, rows)`` name what
    the next forward computes; ``rows(...)`` gives each row's choices by position."""

    def __init__(self, model, prompt_mask: torch.Tensor, k: int, max_new_tokens: int):
        self.routers = routers(model)
        self.topk = next(iter(self.routers.values())).topk if self.routers else 0
        # kept where the routers compute: recording a decode step costs no host sync
        device = next(unwrap(model).parameters()).device
        self.prompt_mask = prompt_mask.bool().to(device)
        self.k = k
        self.prompt_len = self.prompt_mask.sum(-1)
        self.row_prompt_len = self.prompt_len.repeat_interleave(k)
        self.prompt_len_list = self.prompt_len.tolist()  # once, for the rows after the rollout
        rows, width = prompt_mask.size(0) * k, int(self.prompt_len.max()) + max_new_tokens
        self.table = {i: torch.full((rows, width, self.topk), -1, dtype=torch.long,
                                    device=device) for i in self.routers}
        self.where = None
        for index, router in self.routers.items():
            router.router_replay.sink = self._sink(index)

    def prefill(self, prompts: slice) -> None:
        self.where = ("prefill", prompts)

    def decode(self, step: int, rows: slice) -> None:
        self.where = ("decode", step, rows)

    def _sink(self, index: int):
        def record(indices: torch.Tensor) -> None:
            if self.where is None:
                return
            table = self.table[index]
            if self.where[0] == "decode":  # one token per row: the response's token step - 1
                _, step, rows = self.where
                at = self.row_prompt_len[rows] + step - 1
                table[torch.arange(rows.start, rows.stop, device=table.device), at] = indices
                return
            prompts = self.where[1]
            mask = self.prompt_mask[prompts]  # [b, s], left- or right-padded
            b, s = mask.shape
            by_row = indices.view(s, b, -1).transpose(0, 1)  # [b, s, k]
            for j in range(b):
                real = by_row[j][mask[j]]  # the prompt's tokens, in order
                p = prompts.start + j
                table[p * self.k:(p + 1) * self.k, :real.size(0)] = real
        return record

    def close(self) -> None:
        for router in self.routers.values():
            router.router_replay.sink = None
        self.where = None

    def row(self, row: int, length: int) -> dict[int, torch.Tensor]:
        """Rollout row ``row``'s choices per layer for its prompt and ``length`` response tokens,
        [positions, k]; the last token's are -1 (never fed)."""
        end = self.prompt_len_list[row // self.k] + length
        out = {}
        for index, table in self.table.items():
            choices = table[row, :end].clone()
            choices[end - 1:] = -1
            out[index] = choices
        return out


def batch_routes(per_row: list[dict[int, torch.Tensor]], width: int) -> dict[int, torch.Tensor]:
    """A micro-batch's choices per layer, [width, rows, k] (a forward's [s, b] token order),
    -1 beyond each row's recorded positions."""
    out = {}
    for index in per_row[0]:
        k = per_row[0][index].size(-1)
        table = torch.full((width, len(per_row), k), -1, dtype=torch.long,
                           device=per_row[0][index].device)
        for j, routes in enumerate(per_row):
            table[:routes[index].size(0), j] = routes[index]
        out[index] = table
    return out


class TrainingRoutes:
    """In the policy's training-layout forwards of micro-batches that carry ``routes``: counts
    the tokens whose experts differ from the rollout's, or (``replay``) forces the rollout's."""

    def __init__(self, model, replay: bool):
        self.routers = routers(model)
        self.replay = replay
        config = unwrap(model).config
        self.sequence_parallel = config.sequence_parallel
        self.tp = unwrap(model).pg_collection.tp
        device = next(unwrap(model).parameters()).device
        # differing, compared: summed where the routers run (no host sync per micro-batch)
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)
        self.known: dict[int, torch.Tensor] = {}  # this forward's recorded tokens, per layer

    def before_forward(self, batch: dict) -> None:
        routes = batch.get("routes")
        self.known = {}
        for index, router in self.routers.items():
            choice = router.router_replay
            choice.target, choice.sink = None, None
            if routes is None:
                continue
            want = self._local(routes[index]).to(router.weight.device)
            self.known[index] = want[:, 0] >= 0
            if self.replay:
                choice.target = want
            else:
                choice.sink = self._comparer(want)

    def _local(self, table: torch.Tensor) -> torch.Tensor:
        """[width, rows, k] -> this rank's tokens, [tokens, k] (under sequence parallelism the
        router sees its tensor-parallel rank's slice of the sequence)."""
        if self.sequence_parallel and self.tp.size() > 1:
            table = table.chunk(self.tp.size(), dim=0)[self.tp.rank()]
        return table.reshape(-1, table.size(-1))

    def _comparer(self, want: torch.Tensor):
        def compare(indices: torch.Tensor) -> None:
            known = want[:, 0] >= 0
            same = (indices.sort(-1).values == want.sort(-1).values).all(-1)
            self.counts += torch.stack([(known & ~same).sum(), known.sum()]).to(self.counts)
        return compare

    def after(self) -> None:
        self.known = {}
        for router in self.routers.values():
            router.router_replay.target, router.router_replay.sink = None, None
