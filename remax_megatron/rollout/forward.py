"""Inference forward of one pipeline stage over megatron-core's own modules, on any process
groups (the policy's, or a reward model's own tp/pp groups).

The walk reads megatron's own parameters (no copy) and, for its standard layers (torch norms,
ColumnParallelLinear QKV / fc1, RowParallelLinear projections, the unfused MLP), does their math
directly: F.linear with the bias fused where megatron adds it, the tensor-parallel all-reduce of
each row-parallel output. A decode step is a few hundred small ops, so megatron's per-call
plumbing (autograd Functions, config checks, a deprecation warning per row-parallel forward) would
cost a noticeable share of it; any other layer (Transformer Engine, fused activations, ...) runs
through megatron's modules. On the CPU a decode step computes its products as W @ x.T (see
_columns), which MKL runs markedly faster than x @ W.T for a few rows. Attention is a callable so the same walk serves cached decoding
(kv_cache) and full-sequence scoring (attention). Stages pass hidden states point to point; the
last stage returns the final-normed hidden states at chosen positions.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.builder import model_chunks, unwrap
from ..runtime import cpu_compat


class Pipeline:
    """This rank's place in a pipeline group and the point-to-point / broadcast it needs."""

    def __init__(self, pp_group):
        self.group = pp_group
        ranks = dist.get_process_group_ranks(pp_group)
        me = ranks.index(dist.get_rank())
        self.size = len(ranks)
        self.first, self.last = me == 0, me == len(ranks) - 1
        # a ring: with virtual pipeline chunks the last stage passes its chunk's output on to the
        # first stage's next chunk
        self.prev = ranks[(me - 1) % self.size]
        self.next = ranks[(me + 1) % self.size]
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


class _FastLayer:
    """One transformer layer's tensors for a direct decode walk: the same math as megatron's
    SelfAttention / MLP forward (its projections, bias placement, activation and tensor-parallel
    all-reduces), without its per-call plumbing: autograd Functions, config checks, and the
    deprecation warning RowParallelLinear raises on every forward (it passes tp_group=None).
    ``plan`` returns None for anything else (Transformer Engine layers, fused activations, MoE,
    sequence parallelism, attention output gates): those layers run through megatron's modules."""

    __slots__ = ("norm1", "norm2", "qkv_w", "qkv_b", "q_norm", "k_norm", "split", "proj_w",
                 "proj_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b", "activation", "glu", "clamp",
                 "glu_offset", "head_dim", "qkv_bc", "proj_bc", "fc1_bc", "fc2_bc")

    @classmethod
    def plan(cls, layer, tp_size: int):
        from megatron.core.transformer.mlp import MLP
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        attn, mlp = layer.self_attention, layer.mlp
        config = layer.config
        qkv, proj = getattr(attn, "linear_qkv", None), getattr(attn, "linear_proj", None)
        if (type(qkv) is not ColumnParallelLinear or type(proj) is not RowParallelLinear
                or type(mlp) is not MLP or type(mlp.linear_fc1) is not ColumnParallelLinear
                or type(mlp.linear_fc2) is not RowParallelLinear):
            return None
        linears = (qkv, proj, mlp.linear_fc1, mlp.linear_fc2)
        if (any(lin.sequence_parallel or lin.config.defer_embedding_wgrad_compute
                for lin in linears)
                or qkv.gather_output or mlp.linear_fc1.gather_output or qkv.skip_bias_add
                or not proj.input_is_parallel or not mlp.linear_fc2.input_is_parallel
                or not mlp.linear_fc1.skip_bias_add
                or getattr(config, "attention_output_gate", False)
                or config.num_query_groups < tp_size
                or config.bias_activation_fusion
                or getattr(config, "use_te_activation_func", False)):
            return None
        norm1, norm2 = _norm(layer.input_layernorm), _norm(layer.pre_mlp_layernorm)
        if norm1 is None or norm2 is None:
            return None
        self = cls()
        self.norm1, self.norm2 = norm1, norm2
        self.qkv_w, self.qkv_b = qkv.weight, qkv.bias
        self.q_norm, self.k_norm = _optional(attn.q_layernorm), _optional(attn.k_layernorm)
        per = attn.num_attention_heads_per_partition // attn.num_query_groups_per_partition
        d = attn.hidden_size_per_attention_head
        self.head_dim = d
        self.split = (attn.num_query_groups_per_partition, [per * d, d, d])
        # a row-parallel bias is added once, after the all-reduce (here: fused when tp == 1)
        self.proj_w, self.proj_b = proj.weight, proj.bias
        self.fc1_w, self.fc1_b = mlp.linear_fc1.weight, mlp.linear_fc1.bias
        self.fc2_w, self.fc2_b = mlp.linear_fc2.weight, mlp.linear_fc2.bias
        # the biases as columns, for the transposed products of decode steps (_columns)
        self.qkv_bc, self.proj_bc, self.fc1_bc, self.fc2_bc = (
            None if b is None else b[:, None]
            for b in (self.qkv_b, self.proj_b, self.fc1_b, self.fc2_b))
        self.activation, self.glu = config.activation_func, config.gated_linear_unit
        self.clamp = getattr(config, "activation_func_clamp_value", None)
        self.glu_offset = getattr(config, "glu_linear_offset", 0.0)
        return self

    def mlp(self, x, columns: bool = False):
        """megatron MLP.forward's unfused branch, bias added before the activation. With
        ``columns``: x [rows, h] -> the activation transposed, [ffn, rows] (see _columns)."""
        if columns:
            x = _columns(x, self.fc1_w, self.fc1_bc)
        else:
            x = F.linear(x, self.fc1_w, self.fc1_b)
        if not self.glu:
            return self.activation(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=0 if columns else -1)
        if self.clamp is not None:
            x_glu = x_glu.clamp(min=None, max=self.clamp)
            x_linear = x_linear.clamp(min=-self.clamp, max=self.clamp)
        if self.glu_offset:
            x_linear = x_linear + self.glu_offset
        return self.activation(x_glu) * x_linear


def _columns(x: torch.Tensor, weight: torch.Tensor, bias_column=None) -> torch.Tensor:
    """x [rows, in] @ weight.T, computed as weight @ x.T: the result transposed, [out, rows]
    (contiguous). With few rows MKL's kernel for this form is much faster than for F.linear's
    x @ W.T on [out, in] weights (fp32 at 8-64 rows: 20-40%; bf16 at any rows > 1: 20-45%)."""
    if bias_column is None:
        return torch.mm(weight, x.t())
    return torch.addmm(bias_column, weight, x.t())


def _norm(module):
    """A callable with the module's exact computation and no module-call overhead: torch's
    LayerNorm / RMSNorm as their functional forms; None for any other norm."""
    if type(module) is torch.nn.LayerNorm:
        shape, w, b, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: torch.layer_norm(x, shape, w, b, eps)
    if type(module) is torch.nn.RMSNorm:
        shape, w, eps = module.normalized_shape, module.weight, module.eps
        return lambda x: torch.rms_norm(x, shape, w, eps)
    return None


def _optional(module):
    from megatron.core.transformer.identity_op import IdentityOp

    return None if module is None or isinstance(module, IdentityOp) else module


class StageForward:
    """This rank's part of the model: one pipeline stage, or (virtual pipeline) its chunks, each
    a stage of a pipeline of pp * chunks stages that passes the ranks in a ring."""

    def __init__(self, model):
        chunks = [unwrap(chunk) for chunk in model_chunks(model)]
        self.gpt = chunks[0]  # the embedding (first stage), and what every chunk shares
        self.head = chunks[-1]  # the final norm and output layer (last stage)
        self.pipe = Pipeline(self.gpt.pg_collection.pp)
        self.tp_group = self.gpt.pg_collection.tp
        self.tp_size = dist.get_world_size(self.tp_group)
        self.config = self.gpt.config
        # a mixture of experts split over data-parallel ranks: every forward is a collective of
        # the expert-parallel group (its layers exchange tokens), so those ranks step together
        ep = getattr(self.gpt.pg_collection, "ep", None) if self.config.num_moe_experts else None
        self.ep_group = ep if ep is not None and ep.size() > 1 else None
        self.layers = [layer for chunk in chunks for layer in chunk.decoder.layers]
        ends = list(itertools.accumulate(len(chunk.decoder.layers) for chunk in chunks))
        self.chunk_layers = [range(start, end) for start, end in zip([0] + ends, ends)]
        self.fast = [_FastLayer.plan(layer, self.tp_size) for layer in self.layers]
        self.final_norm = (_norm(self.head.decoder.final_layernorm)
                           or self.head.decoder.final_layernorm) if self.pipe.last else None
        self.embed = _plain_embedding(self.gpt, self.tp_size) if self.pipe.first else None
        self._output = None  # (vocab_size, weight rows of the true vocabulary)
        rope = self.gpt.position_embedding_type == "rope"
        self.rope = self.gpt.rotary_pos_emb if rope else None
        param = next(self.gpt.parameters())
        self.device = param.device
        self.dtype = self.config.params_dtype
        # fewest rows for which a decode step uses the transposed products (_columns): CPU only
        # (cuBLAS has no such gap); fp32 products of 2-4 rows are faster as F.linear
        self.column_rows = (None if self.device.type != "cpu"
                            else 8 if param.dtype == torch.float32 else 2)
        self._rope_table = None
        self._rope_reserved = False

    def all_done(self, done: bool) -> bool:
        """Whether this rank, and with expert parallelism every rank of its group, is done."""
        if self.ep_group is None:
            return done
        flag = torch.tensor([0 if done else 1], device=self.device)
        dist.all_reduce(flag, group=self.ep_group)
        return int(flag) == 0

    def reserve_positions(self, count: int) -> None:
        """Build the RoPE table for positions < ``count`` now: later steps index it without
        asking for their largest position (a host sync per step)."""
        if self.rope is not None:
            self._rope_table_for(count)
            self._rope_reserved = True

    def _rope_table_for(self, needed: int):
        if self._rope_table is None or self._rope_table.size(0) < needed:
            with cpu_compat.active():  # megatron's RoPE moves its table to "the CUDA device"
                self._rope_table = self.rope(max(needed, 64))  # [max, 1, 1, d]
        return self._rope_table

    def rope_for(self, positions: torch.Tensor):
        """Per-row RoPE angles [s, b, 1, d] for positions [b, s]."""
        if self.rope is None:
            return None
        table = (self._rope_table if self._rope_reserved
                 else self._rope_table_for(int(positions.max()) + 1))
        return table[positions.t()].squeeze(3)

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, attend, pick=None):
        """ids/positions [b, s]; ``attend(layer_index, q, k, v)`` -> context [s, b, heads * d].
        Last stage: final-normed hidden states [1, b, h] at ``pick`` [b] (or the only position);
        other stages: None (their output went to the next stage)."""
        b, s = ids.shape
        rope = self.rope_for(positions)
        columns = self.use_columns(s, b)
        for chunk, indices in enumerate(self.chunk_layers):
            if chunk == 0 and self.embed is not None:
                hidden = self.embed(ids, positions)
            elif chunk == 0 and self.pipe.first:
                hidden = self.gpt.embedding(input_ids=ids, position_ids=positions)
            else:
                hidden = self.pipe.receive((s, b, self.config.hidden_size), self.dtype,
                                           self.device)
            for index in indices:
                fast = self.fast[index]
                if fast is None:
                    hidden = self._megatron_layer(self.layers[index], index, hidden, rope, attend)
                elif columns:
                    hidden = self._fast_layer_columns(fast, index, hidden, rope, attend)
                else:
                    hidden = self._fast_layer(fast, index, hidden, rope, attend)
            if not (self.pipe.last and chunk == len(self.chunk_layers) - 1):
                self.pipe.send(hidden)
        if not self.pipe.last:
            return None
        if pick is not None:
            hidden = hidden[pick, torch.arange(b, device=hidden.device)].unsqueeze(0)
        return self.final_norm(hidden)

    def use_columns(self, s: int, b: int) -> bool:
        """Whether a step of ``s`` positions of ``b`` rows runs its products transposed."""
        return s == 1 and self.column_rows is not None and b >= self.column_rows

    def _fast_layer_columns(self, fast: _FastLayer, index: int, hidden, rope, attend):
        """_fast_layer for one position per row ([1, b, h]) with every product transposed
        (_columns): the same values up to float rounding; activations between the products stay
        transposed, so only q (for attention) is copied."""
        tp = self.tp_size > 1
        b = hidden.size(1)
        qkv = _columns(fast.norm1(hidden)[0], fast.qkv_w, fast.qkv_bc).t()  # [b, 3h] view
        context = attend(index, *self._heads(fast, qkv, 1, b, rope))
        out = _columns(context[0], fast.proj_w, None if tp else fast.proj_bc)
        hidden = hidden + self._row_parallel_bias(out, fast.proj_bc).t() if tp else hidden + out.t()
        act = fast.mlp(fast.norm2(hidden)[0], columns=True)  # [ffn, b]
        out = _columns(act.t(), fast.fc2_w, None if tp else fast.fc2_bc)
        if tp:
            return hidden.add_(self._row_parallel_bias(out, fast.fc2_bc).t())
        return hidden.add_(out.t())  # hidden is this step's own tensor

    def _fast_layer(self, fast: _FastLayer, index: int, hidden, rope, attend):
        tp = self.tp_size > 1
        s, b = hidden.shape[:2]
        qkv = F.linear(fast.norm1(hidden), fast.qkv_w, fast.qkv_b)
        context = attend(index, *self._heads(fast, qkv, s, b, rope))
        out = F.linear(context, fast.proj_w, None if tp else fast.proj_b)
        hidden = hidden + self._row_parallel_bias(out, fast.proj_b) if tp else hidden + out
        out = F.linear(fast.mlp(fast.norm2(hidden)), fast.fc2_w, None if tp else fast.fc2_b)
        return hidden + self._row_parallel_bias(out, fast.fc2_b) if tp else hidden + out

    def _heads(self, fast: _FastLayer, qkv, s: int, b: int, rope):
        """q, k, v [s, b, heads, d] from the fused projection's output (q/k norms, RoPE)."""
        groups, split = fast.split
        q, k, v = qkv.view(s, b, groups, -1).split_with_sizes(split, dim=3)
        q = q.reshape(s, b, -1, fast.head_dim)
        if fast.q_norm is not None:
            q = fast.q_norm(q)
        if fast.k_norm is not None:
            k = fast.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope), self._rotate(k, rope)
        return q, k, v

    def _row_parallel_bias(self, out, bias):
        dist.all_reduce(out, group=self.tp_group)
        return out if bias is None else out + bias

    def _rotate(self, x, rope):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        return apply_rotary_pos_emb(x, rope, self.config)

    def _megatron_layer(self, layer, index: int, hidden, rope, attend):
        """The layer through megatron's own modules (Transformer Engine, fused or other layers);
        on the CPU with the compatibility layer on (an MoE layer allocates on "the CUDA device"
        at every call)."""
        with cpu_compat.active():
            attn = layer.self_attention
            q, k, v = attn.get_query_key_value_tensors(layer.input_layernorm(hidden))
            if rope is not None:
                q, k = self._rotate(q, rope), self._rotate(k, rope)
            out, bias = attn.linear_proj(attend(index, q, k, v))
            hidden = hidden + (out if bias is None else out + bias)
            out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
            return hidden + (out if bias is None else out + bias)

    def output_weight(self) -> torch.Tensor:
        return (self.head.shared_embedding_or_output_weight()
                if self.head.share_embeddings_and_output_weights else None)

    def logits(self, hidden: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """Full-vocabulary logits [b, V] (fp32) from [1, b, h]: the vocab-parallel output layer,
        gathered over tensor parallelism. With ``vocab_size`` (the true vocabulary) only its
        first ``vocab_size`` ids, else every (padded) id."""
        output_layer = self.head.output_layer
        weight = self.output_weight()
        if self.tp_size == 1 and _plain_output_layer(output_layer):
            if self._output is None or self._output[0] != vocab_size:
                weight = output_layer.weight if weight is None else weight
                self._output = (vocab_size, weight if vocab_size is None else weight[:vocab_size])
            weight = self._output[1]
            if not self.use_columns(1, hidden.size(1)):
                return F.linear(hidden[0], weight).float()
            transposed = _columns(hidden[0], weight)  # [V, b]
            logits = torch.empty(transposed.shape[::-1], dtype=torch.float32,
                                 device=transposed.device)
            return logits.copy_(transposed.t())
        logits, _ = output_layer(hidden, weight=weight)
        logits = logits[0]
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(parts, dim=-1)
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        return logits.float()

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """A reward model's scalar scores [b] (fp32) from [1, b, h]."""
        return self.head.score_head(hidden)[0, :, 0].float()


def _plain_embedding(gpt, tp_size: int):
    """megatron's LanguageModelEmbedding forward without its module calls where it reduces to
    word (+ learned position) embeddings: one tensor-parallel rank, no sequence parallelism,
    no dropout; None otherwise (megatron's module runs)."""
    from megatron.core.models.common.embeddings.language_model_embedding import (
        LanguageModelEmbedding)
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

    embedding = getattr(gpt, "embedding", None)
    if (tp_size != 1 or type(embedding) is not LanguageModelEmbedding
            or type(embedding.word_embeddings) is not VocabParallelEmbedding
            or embedding.reduce_scatter_embeddings or embedding.config.sequence_parallel
            or embedding.config.fp32_residual_connection
            or getattr(embedding, "tokentype_embeddings", None) is not None
            or embedding.embedding_dropout.p > 0):
        return None
    words = embedding.word_embeddings.weight
    positions = embedding.position_embeddings.weight if embedding.add_position_embedding else None
    if positions is not None and type(embedding.position_embeddings) is not torch.nn.Embedding:
        return None

    def embed(ids, position_ids):
        out = F.embedding(ids, words)
        if positions is not None:
            out = out + F.embedding(position_ids, positions)
        return out.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
    return embed


def _plain_output_layer(layer) -> bool:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    return (type(layer) is ColumnParallelLinear and layer.bias is None
            and not layer.sequence_parallel and not layer.config.defer_embedding_wgrad_compute)
