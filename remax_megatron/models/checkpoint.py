"""remax-megatron checkpoint directories: megatron-core dist_checkpointing weights that load at any
valid tp/pp, plus everything needed to rebuild the model and talk to users.

  CKPT/
    remax_checkpoint.json   kind (policy | reward), source architecture, dtype, true vocab size, step
    model_config.yaml       the ModelConfig
    hf_config.json          the source config.json (for export back to transformers)
    tokenizer/              the tokenizer files (when the source had them)
    model/                  dist_checkpointing weights (resharded on load)

``load_model`` is the one loading function every command uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config_io import ConfigError, atomic_write_text, from_dict, load_yaml, save_yaml
from .builder import build_chunks, dtype_from_name, model_chunks, unwrap
from .checksums import verify_checksums
from .config import ModelConfig
from .dcp_reader import DAMAGED, check_weights, load_sharded, read_json

log = logging.getLogger(__name__)

META_FILE = "remax_checkpoint.json"
CONFIG_FILE = "model_config.yaml"
HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_DIR = "tokenizer"
WEIGHTS_DIR = "model"
FORMAT_VERSION = 1
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class CheckpointMeta:
    kind: str  # "policy" or "reward"
    architecture: str  # the HF class it came from / exports to
    model_type: str  # gpt2 | llama | mistral | qwen2 | qwen3
    dtype: str  # fp32 | bf16 | fp16
    vocab_size: int  # the tokenizer's true vocabulary
    step: Optional[int] = None  # training step, for checkpoints written by `train`
    format_version: int = FORMAT_VERSION
    source: str = ""

    @property
    def is_reward(self) -> bool:
        return self.kind == "reward"


@dataclass
class Checkpoint:
    path: Path
    meta: CheckpointMeta
    config: ModelConfig
    hf_config: Optional[dict]

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        path = self.path / TOKENIZER_DIR
        return path if path.is_dir() else None


def read_checkpoint(path) -> Checkpoint:
    """Metadata and config of a checkpoint directory; one-line errors when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        hint = (" (it looks like a Hugging Face directory: run remax-megatron convert hf-to-mcore "
                f"--hf {path} --out DIR first)" if (path / "config.json").is_file() else "")
        raise ConfigError(f"{path} is not a remax-megatron checkpoint: no {META_FILE}{hint}")
    raw = read_json(meta_path)
    version = raw.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:  # before its keys are checked
        raise ConfigError(f"{path} was written by a newer remax-megatron (format "
                          f"{version}): upgrade remax-megatron")
    meta = _from_file(CheckpointMeta, raw, meta_path, "checkpoint")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"{config_path} is missing: {DAMAGED}")
    config = _from_file(ModelConfig, load_yaml(config_path), config_path, "model")
    if not (path / WEIGHTS_DIR / "metadata.json").is_file():
        raise ConfigError(f"{path}/{WEIGHTS_DIR} holds no finished dist_checkpointing weights: "
                          "the checkpoint is incomplete (an interrupted save?)")
    hf_path = path / HF_CONFIG_FILE
    hf_config = read_json(hf_path) if hf_path.is_file() else None
    return Checkpoint(path=path, meta=meta, config=config, hf_config=hf_config)


def _from_file(cls, data: dict, path: Path, where: str):
    """``from_dict`` with the file named in its errors (a missing key is a TypeError there)."""
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"{path} lacks {missing[0]}: {DAMAGED}")
    try:
        return from_dict(cls, data, where)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}: {DAMAGED}") from None


def write_checkpoint_files(directory: Path, meta: CheckpointMeta, config: ModelConfig,
                           hf_config: Optional[dict]) -> None:
    """The small files next to the weights (rank 0 writes them)."""
    atomic_write_text(directory / META_FILE, json.dumps(asdict(meta), indent=2) + "\n")
    save_yaml(config, directory / CONFIG_FILE)
    if hf_config is not None:
        atomic_write_text(directory / HF_CONFIG_FILE, json.dumps(hf_config, indent=2) + "\n")


def sharded_state_dict(model) -> dict:
    """megatron's sharded state dict with the model's own data-parallel group (a reward model
    on its own process groups has a different one than parallel_state's). Virtual pipeline
    chunks: one dict per chunk under "model0", "model1", ... (as Megatron-LM saves them); the
    files store each tensor under its global name, so any layout loads them."""
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return _chunk_state_dict(unwrap(chunks[0]))
    return {f"model{v}": _chunk_state_dict(unwrap(chunk)) for v, chunk in enumerate(chunks)}


def _chunk_state_dict(gpt) -> dict:
    dp_cp = getattr(gpt.pg_collection, "dp_cp", None)
    return gpt.sharded_state_dict(metadata={"dp_cp_group": dp_cp} if dp_cp is not None else None)


def save_weights(model, directory: Path) -> None:
    """dist_checkpointing save of ``model`` (every rank calls it) into ``directory``."""
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict(model), str(directory))


def save_full_weights(model, named_tensors, directory: Path) -> None:
    """Save a single-rank (tp=1, pp=1) ``model``'s checkpoint with the weights given as
    ``(name, full tensor)`` pairs, without copying them into the model.

    The model only supplies megatron's sharding metadata: its parameters are never written, so
    (allocated with torch.empty) they never become resident, and the process holds one copy of
    the weights (the converted tensors) instead of two.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from .builder import unwrap

    gpt = unwrap(model)
    state = gpt.sharded_state_dict()
    params = dict(gpt.named_parameters())
    unset = set(params)
    for name, tensor in named_tensors:
        param = params[name]
        entry = state[name]
        tensor = _fit_to_param(tensor, param)
        entry.data = tensor
        if isinstance(entry, ShardedTensorFactory):
            # e.g. SwiGLU fc1 -> (gate, up) views; the writer would clone views, so own them now
            built = entry.build()
            for sharded in built:
                sharded.data = sharded.data.clone()
            state[name] = built
        unset.discard(name)
    if unset:
        raise RuntimeError(f"no weights given for {sorted(unset)[0]}")
    directory.mkdir(parents=True, exist_ok=True)
    # One writer process: each forked writer dirties its own copy of the interpreter's heap.
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save(state, str(directory), sharded_strategy=strategy)


def _fit_to_param(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the parameter's dtype and shape (vocab rows padded with zeros)."""
    tensor = tensor.to(param.dtype).contiguous()
    if tensor.shape == param.shape:
        return tensor
    if tensor.shape[1:] == param.shape[1:] and tensor.shape[0] < param.shape[0]:
        padded = torch.zeros(param.shape, dtype=param.dtype)
        padded[:tensor.shape[0]] = tensor
        return padded
    raise RuntimeError(f"mapped shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")


def load_weights(model, directory: Path) -> None:
    """Load (and reshard) dist_checkpointing weights into this rank's part of ``model`` (a model
    or a list of virtual pipeline chunks)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    gpts = [unwrap(chunk) for chunk in model_chunks(model)]
    states, in_place = [], []
    for gpt in gpts:
        # Transformer Engine modules add `_extra_state` (fp8 metadata, no weights): a checkpoint
        # written without TE has none, and the weights load either way. (Those entries are
        # pickled objects: not asking for them also means torch never unpickles them.)
        state = {k: v for k, v in _chunk_state_dict(gpt).items()
                 if not k.endswith("._extra_state")}
        # Factories (SwiGLU fc1) would load into fresh halves and concatenate them into a third
        # copy; building them here makes their halves views of the parameter, loaded in place.
        built = [name for name, entry in state.items() if isinstance(entry, ShardedTensorFactory)]
        for name in built:
            state[name] = state[name].build()
        states.append(state)
        in_place.append(built)
    if len(gpts) == 1:
        loaded = [load_sharded(states[0], directory)]
    else:
        request = {f"model{v}": state for v, state in enumerate(states)}
        everything = load_sharded(request, directory)
        loaded = [everything[f"model{v}"] for v in range(len(gpts))]
    for gpt, state, built in zip(gpts, loaded, in_place):
        for name in built:
            state.pop(name)
        result = gpt.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("._extra_state") and
                   k not in built]
        if missing:
            raise ConfigError(f"checkpoint {directory} lacks {missing[0]} (and "
                              f"{len(missing) - 1} more): it was saved from a different model")


def load_model(path, params_dtype: Optional[torch.dtype] = None, spec: str = "auto",
               pg_collection=None, expect_kind: Optional[str] = None, virtual_pp: int = 1,
               **build_options):
    """Build the model a checkpoint describes for this rank's tp/pp stage and load its weights.

    Returns ``(model, checkpoint)``; with ``virtual_pp`` > 1 the model is the list of the
    stage's virtual pipeline chunks. ``params_dtype`` defaults to the dtype it
    was saved in; ``build_options`` go to the builder (recompute, sequence_parallel).
    """
    from ..runtime.layout import validate_layout
    from .builder import _group_sizes

    ckpt = read_checkpoint(path)
    check_weights(ckpt.path / WEIGHTS_DIR)  # damaged files fail here, before any model is built
    # a training checkpoint's optimizer and RNG files are checked when a run resumes from it
    verify_checksums(ckpt.path, skip=("optimizer", "rng"))
    if expect_kind is not None and ckpt.meta.kind != expect_kind:
        raise ConfigError(f"{path} holds a {ckpt.meta.kind} model ({ckpt.meta.architecture}), "
                          f"but a {expect_kind} model is needed here")
    tp, pp = _group_sizes(pg_collection)
    validate_layout(tp * pp, tp, pp, ckpt.config, what=f"{ckpt.meta.kind} model")
    dtype = params_dtype or dtype_from_name(ckpt.meta.dtype)
    chunks = build_chunks(ckpt.config, virtual_pp, reward=ckpt.meta.is_reward, params_dtype=dtype,
                          spec=spec, pg_collection=pg_collection, perform_initialization=False,
                          **build_options)
    model = chunks if virtual_pp > 1 else chunks[0]
    load_weights(model, ckpt.path / WEIGHTS_DIR)
    # megatron keeps a few modules (learned positions, torch norms) in fp32 whatever params_dtype
    # says; one dtype throughout is what megatron's Float16Module would give, without the wrapper.
    model = [chunk.to(dtype) for chunk in model] if virtual_pp > 1 else model.to(dtype)
    log.info("loaded %s %s from %s (tp=%d pp=%d, %s)", ckpt.meta.kind, ckpt.meta.architecture,
             ckpt.path, tp, pp, DTYPE_NAMES.get(dtype, str(dtype)))
    return model, ckpt
