"""Decode steps on static buffers, replayed as one CUDA graph per rollout on a GPU.

A small-batch decode step launches a few hundred kernels that each run for microseconds: on a
GPU the host's launch overhead, not the weights' bandwidth, sets its time. Every step of a rollout
has the same shapes once its inputs live in fixed buffers and the step is a device tensor (the
KV cache's static mode), so the step is captured once as a CUDA graph and replayed: one launch
per token. Used where the whole batch decodes at once on one process per pipeline (pp = 1; a
graph holds no point-to-point messages) and one tensor-parallel rank; elsewhere, and on the CPU,
the rollout's eager steps run. On the CPU the same static step can run uncaptured (tests compare
it with the eager one).
"""

from __future__ import annotations

import torch

from .forward import StageForward
from .kv_cache import SharedPrefixKVCache


def static_decode_applies(fwd: StageForward, whole_batch: bool) -> bool:
    """Whether this rollout's decode steps can run as one captured graph."""
    return whole_batch and fwd.pipe.size == 1 and fwd.tp_size == 1


class StaticDecode:
    """Runs decode steps of ``rows`` rows through fixed buffers; ``capture``: as a CUDA graph
    (captured at the first step, after one warm-up run on a side stream)."""

    def __init__(self, fwd: StageForward, cache: SharedPrefixKVCache, rows: int,
                 vocab_size: int, capture: bool):
        device = fwd.device
        self.fwd, self.cache, self.vocab_size = fwd, cache, vocab_size
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        config = fwd.config
        self.per = config.num_attention_heads // config.num_query_groups
        self.capture = capture
        self.graph = None
        self.logits = None

    def _step(self) -> torch.Tensor:
        self.cache.set_static_step(self.step, self.per)

        def attend(layer, q, k, v):
            return self.cache.decode_static(layer, q, k, v)

        hidden = self.fwd.hidden(self.ids, self.positions, attend)
        return self.fwd.logits(hidden, self.vocab_size)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, step: int) -> torch.Tensor:
        """Logits [rows, vocab] (fp32) of decode step ``step`` for ``ids`` / ``positions``
        [rows, 1]. Captured: the graph's output buffer, valid until the next call."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.step.fill_(step)
        if not self.capture:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # a warm-up run first (lazy initializations, cuBLAS workspaces) on a side stream, as
        # torch's graph capture wants; it writes this step's keys/values, which the replay
        # writes again identically
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
