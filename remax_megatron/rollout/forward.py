"""Inference forward of one pipeline stage over megatron-core's own modules, on any process
groups (the policy's, or a reward model's own tp/pp groups).

Tensor parallelism stays inside megatron's layers; attention is a callable so the same walk
serves cached decoding (kv_cache) and full-sequence scoring (attention). Stages pass hidden
states point to point; the last stage returns the final-normed hidden states at chosen positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.builder import unwrap
from ..runtime import cpu_compat


class Pipeline:
    """This rank's place in a pipeline group and the point-to-point / broadcast it needs."""

    def __init__(self, pp_group):
        self.group = pp_group
        ranks = dist.get_process_group_ranks(pp_group)
        me = ranks.index(dist.get_rank())
        self.size = len(ranks)
        self.first, self.last = me == 0, me == len(ranks) - 1
        self.prev = ranks[me - 1] if me > 0 else None
        self.next = ranks[me + 1] if me < len(ranks) - 1 else None
        self.last_rank = ranks[-1]

    def receive(self, shape, dtype, device) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src=self.prev, group=self.group)
        return buf

    def send(self, tensor: torch.Tensor) -> None:
        dist.send(tensor.contiguous(), dst=self.next, group=self.group)

    def from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's ``tensor`` on every stage (same shape and dtype everywhere)."""
        if self.size > 1:
            dist.broadcast(tensor, src=self.last_rank, group=self.group)
        return tensor


class StageForward:
    def __init__(self, model):
        self.gpt = unwrap(model)
        self.pipe = Pipeline(self.gpt.pg_collection.pp)
        self.tp_group = self.gpt.pg_collection.tp
        self.config = self.gpt.config
        self.layers = list(self.gpt.decoder.layers)
        rope = self.gpt.position_embedding_type == "rope"
        self.rope = self.gpt.rotary_pos_emb if rope else None
        self.device = next(self.gpt.parameters()).device
        self.dtype = self.config.params_dtype
        self._rope_table = None

    def rope_for(self, positions: torch.Tensor):
        """Per-row RoPE angles [s, b, 1, d] for positions [b, s]."""
        if self.rope is None:
            return None
        needed = int(positions.max()) + 1
        if self._rope_table is None or self._rope_table.size(0) < needed:
            with cpu_compat.active():  # megatron's RoPE moves its table to "the CUDA device"
                self._rope_table = self.rope(max(needed, 64))  # [max, 1, 1, d]
        return self._rope_table[positions.t()].squeeze(3)

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, attend, pick=None):
        """ids/positions [b, s]; ``attend(layer_index, q, k, v)`` -> context [s, b, heads * d].
        Last stage: final-normed hidden states [1, b, h] at ``pick`` [b] (or the only position);
        other stages: None (their output went to the next stage)."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        b, s = ids.shape
        if self.pipe.first:
            hidden = self.gpt.embedding(input_ids=ids, position_ids=positions)
        else:
            hidden = self.pipe.receive((s, b, self.config.hidden_size), self.dtype, self.device)
        rope = self.rope_for(positions)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attention
            q, k, v = attn.get_query_key_value_tensors(layer.input_layernorm(hidden))
            if rope is not None:
                q = apply_rotary_pos_emb(q, rope, self.config)
                k = apply_rotary_pos_emb(k, rope, self.config)
            out, bias = attn.linear_proj(attend(index, q, k, v))
            hidden = hidden + (out if bias is None else out + bias)
            out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = hidden + (out if bias is None else out + bias)
        if not self.pipe.last:
            self.pipe.send(hidden)
            return None
        if pick is not None:
            hidden = hidden[pick, torch.arange(b, device=hidden.device)].unsqueeze(0)
        return self.gpt.decoder.final_layernorm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [b, V_padded] (fp32) from [1, b, h]: the vocab-parallel output
        layer, gathered over tensor parallelism."""
        weight = (self.gpt.shared_embedding_or_output_weight()
                  if self.gpt.share_embeddings_and_output_weights else None)
        logits, _ = self.gpt.output_layer(hidden, weight=weight)
        logits = logits[0]
        size = dist.get_world_size(self.tp_group)
        if size > 1:
            parts = [torch.empty_like(logits) for _ in range(size)]
            dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(parts, dim=-1)
        return logits.float()

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """A reward model's scalar scores [b] (fp32) from [1, b, h]."""
        return self.gpt.score_head(hidden)[0, :, 0].float()
