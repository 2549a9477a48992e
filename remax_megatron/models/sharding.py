"""Full (single-rank) weights <-> this rank's shards of a tp/pp megatron-core model.

The "full" form is the state dict of a tp=1, pp=1 model with global layer numbers and the
vocabulary cut to its true size, so it does not depend on the layout. Megatron marks every
tensor-parallel parameter with ``partition_dim`` and ``partition_stride`` (2 for a SwiGLU fc1,
whose rank-r shard is cat(gate_chunk_r, up_chunk_r)); those two numbers are all the tp rule needs.
"""

from __future__ import annotations

import re

import torch

from ..seeds import mix_seed

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def layer_offset(model) -> int:
    """Global index of this pipeline stage's first transformer layer."""
    from .builder import unwrap

    layers = unwrap(model).decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def expert_offset(model) -> int:
    """Global index of this expert-parallel rank's first expert (0 without experts)."""
    from .builder import unwrap

    gpt = unwrap(model)
    experts = getattr(gpt.config, "num_moe_experts", None)
    group = getattr(gpt.pg_collection, "ep", None)
    if not experts or group is None:
        return 0
    return group.rank() * (experts // group.size())


def global_name(local_name: str, offset: int, experts_from: int = 0) -> str:
    """``decoder.layers.{i}.x`` on a pipeline stage -> ``decoder.layers.{i + offset}.x``; an
    expert-parallel rank's ``local_experts.{e}`` -> ``local_experts.{e + experts_from}``."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    name = f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"
    expert = _EXPERT.match(name) if experts_from else None
    if expert:
        name = f"{expert.group(1)}{int(expert.group(2)) + experts_from}{expert.group(3)}"
    return name


def shard(full: torch.Tensor, rank: int, size: int, dim: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full``: ``stride`` blocks along ``dim``, each chunked ``size`` ways."""
    if size == 1:
        return full
    blocks = torch.chunk(full, stride, dim=dim)
    return torch.cat([torch.chunk(b, size, dim=dim)[rank] for b in blocks], dim=dim)


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor from every rank's slice, in rank order."""
    if len(shards) == 1:
        return shards[0]
    per_block = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[b] for p in per_block], dim=dim) for b in range(stride)], dim=dim)


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Grow (zeros) or cut the vocab dim (0) to ``padded_size``."""
    rows = weight.size(0)
    if rows >= padded_size:
        return weight[:padded_size]
    pad = weight.new_zeros((padded_size - rows, *weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)


def _tp_rule(param) -> tuple[int, int] | None:
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, getattr(param, "partition_stride", 1)


def _tp_rank_size(model) -> tuple[int, int]:
    from .builder import unwrap

    tp_group = unwrap(model).pg_collection.tp
    return tp_group.rank(), tp_group.size()


def _source_name(name: str, full: dict, tied: bool) -> str:
    if name == "output_layer.weight" and tied and name not in full:
        return "embedding.word_embeddings.weight"  # the last stage's copy of tied embeddings
    return name


def load_full_state_dict(model, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy this rank's slices of ``full`` (layout-independent form) into ``model``'s parameters."""
    from .builder import unwrap

    gpt = unwrap(model)
    tp_rank, tp_size = _tp_rank_size(gpt)
    offset, experts_from = layer_offset(gpt), expert_offset(gpt)
    tied = gpt.share_embeddings_and_output_weights
    missing = []
    with torch.no_grad():
        for local, tensor in gpt.state_dict(keep_vars=True).items():
            if local.endswith("._extra_state"):
                continue
            name = _source_name(global_name(local, offset, experts_from), full, tied)
            if name not in full:
                missing.append(name)
                continue
            value = full[name]
            rule = _tp_rule(tensor)
            if name in VOCAB_PARAMS or local in VOCAB_PARAMS:
                value = pad_vocab(value, tensor.size(0) * (tp_size if rule else 1))
            if rule:
                value = shard(value, tp_rank, tp_size, *rule)
            if value.shape != tensor.shape:
                raise ValueError(
                    f"{name}: full shape {tuple(full[name].shape)} gives a shard of "
                    f"{tuple(value.shape)}, but this rank's parameter is {tuple(tensor.shape)}"
                )
            tensor.copy_(value)
    if missing and strict:
        raise KeyError(f"weights missing for {len(missing)} parameters, first: {missing[0]}")


def local_shards(model, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """This rank's tensors keyed by global name, each with what ``unshard`` needs to rebuild it.

    ``tensors`` (keyed by local name) replaces the parameters, e.g. with their gradients.
    """
    from .builder import unwrap

    gpt = unwrap(model)
    offset, experts_from = layer_offset(gpt), expert_offset(gpt)
    out = {}
    for local, param in gpt.named_parameters():
        value = param.detach() if tensors is None else tensors[local]
        rule = _tp_rule(param)
        out[global_name(local, offset, experts_from)] = {
            "tensor": value.detach().cpu(),
            "rule": rule,
        }
    return out


def assemble_full(per_rank: list[dict[str, dict]], true_vocab_size: int) -> dict[str, torch.Tensor]:
    """Full tensors from ``local_shards`` of every rank of one tp group (in tp-rank order),
    merged over pipeline stages; vocab padding removed."""
    names = {}
    for shards in per_rank:
        for name in shards:
            names.setdefault(name, None)
    full = {}
    for name in names:
        parts = [s[name] for s in per_rank if name in s]
        rule = parts[0]["rule"]
        tensor = parts[0]["tensor"] if rule is None else unshard([p["tensor"] for p in parts], *rule)
        if name in VOCAB_PARAMS:
            tensor = tensor[:true_vocab_size]
        full[name] = tensor
    return full


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The layout-independent weights of a single-rank (tp=1, pp=1) model."""
    from .builder import unwrap

    gpt = unwrap(model)
    vocab = gpt.model_config.vocab_size
    return {
        name: (t[:vocab] if name in VOCAB_PARAMS else t).detach().clone()
        for name, t in gpt.state_dict().items()
        if not name.endswith("._extra_state")
    }


def initial_kind(name: str) -> str:
    """How a fresh model starts a parameter: biases at zero (Transformer Engine's fused norms
    included: ``linear_qkv.layer_norm_bias``), norm scales at one, the rest random."""
    last = name.rsplit(".", 1)[-1]
    if last.endswith("bias"):
        return "zeros"
    return "ones" if "norm" in name else "normal"


def seeded_full_weights(model, seed: int) -> dict[str, torch.Tensor]:
    """Fresh weights for this rank's parameters in the layout-independent full form, each drawn
    from a generator seeded by (seed, global name): the same model at every tp/pp layout.

    megatron-style init: normal(0, std) weights, std / sqrt(2 * layers) for the projections
    into the residual stream, ones for norm scales, zeros for biases.
    """

    from .builder import unwrap

    gpt = unwrap(model)
    cfg = gpt.config
    tp_size = gpt.pg_collection.tp.size()
    offset, experts_from = layer_offset(gpt), expert_offset(gpt)
    vocab = gpt.model_config.vocab_size
    out = {}
    for local, param in gpt.named_parameters():
        name = global_name(local, offset, experts_from)
        shape = list(param.shape)
        rule = _tp_rule(param)
        if rule:
            shape[rule[0]] *= tp_size
        if name in VOCAB_PARAMS or local in VOCAB_PARAMS:
            shape[0] = vocab
        kind = initial_kind(name)
        if kind == "zeros":
            out[name] = torch.zeros(shape)
        elif kind == "ones":
            out[name] = torch.ones(shape)
        else:
            std = cfg.init_method_std
            if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                std = std / (2.0 * cfg.num_layers) ** 0.5
            # a pipeline's last stage holds its own copy of tied embeddings: the same values
            source = _source_name(name, {}, gpt.share_embeddings_and_output_weights)
            g = torch.Generator().manual_seed(mix_seed(seed, source))
            out[name] = torch.randn(shape, generator=g) * std
    return out
