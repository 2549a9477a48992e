"""`convert hf-to-mcore` and `convert mcore-to-hf`.

Both stream: one full copy of the weights (the model being written or read) plus one layer's
tensors in flight. Output goes to a temporary directory beside --out and is renamed into place
only when complete, so an error or a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch

from ..config_io import ConfigError
from ..models.checkpoint import (
    DTYPE_NAMES, TOKENIZER_DIR, WEIGHTS_DIR, CheckpointMeta, load_model, read_checkpoint,
    save_full_weights, write_checkpoint_files,
)
from ..models.checksums import digest, listed_files, write_checksums
from ..models.config import ModelConfig
from ..models.hf_config import HFModelInfo, from_hf_config, to_hf_config
from ..models.locate import resolve_checkpoint
from ..path_checks import check_apart, overlap
from . import gpt2, llama, moe, rules
from .hf_files import (
    HFWeights, ShardedSafetensorsWriter, GENERATION_CONFIG, copy_files, directory_is_empty,
    has_tokenizer, open_hf_weights, replace_directory, tmp_sibling,
)

log = logging.getLogger(__name__)


def family_module(model_type: str) -> ModuleType | moe.MoEFamily:
    """The conversion rules of a model type (a module, or an MoE family's naming)."""
    if model_type in moe.FAMILIES:
        return moe.FAMILIES[model_type]
    return gpt2 if model_type == "gpt2" else llama


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a directory path")
    if not directory_is_empty(out) and not force:
        raise ConfigError(f"--out {out} is not empty: choose a new directory or pass --force "
                          "to replace it")


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ConfigError(f"--hf {hf_dir} does not exist")
    if not path.is_file():
        raise ConfigError(f"{hf_dir} has no config.json: point --hf at a save_pretrained directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON (line {err.lineno}): fix or re-download "
                          "it") from None


def _resolve_model_type(info: HFModelInfo, requested: str) -> bool:
    if requested == "auto":
        return info.is_reward
    if requested == "reward" and not info.is_reward:
        raise ConfigError(f"--model-type reward needs a sequence classifier, but config.json "
                          f"says {info.architecture}")
    if requested == "causal-lm" and info.is_reward:
        raise ConfigError(f"--model-type causal-lm needs a causal LM, but config.json says "
                          f"{info.architecture}")
    return requested == "reward"


def check_weights_match_config(weights: HFWeights, family: ModuleType, config: ModelConfig,
                               reward: bool) -> dict[str, str]:
    """Map canonical HF names to the stored ones; one-line errors for missing, extra or
    mis-shaped tensors (before anything is built)."""
    stored = {}
    for name in weights.names():
        canonical = family.normalize_hf_name(name)
        if canonical is not None:
            stored[canonical] = name
    expected = rules.planned_shapes(family, config, reward)
    for name, shape in expected.items():
        if name not in stored:
            raise ConfigError(f"the weights lack {name}: the checkpoint is incomplete or is not "
                              f"the model config.json describes")
        got = weights.shape(stored[name])
        if tuple(got) != tuple(shape):
            raise ConfigError(f"{name} has shape {tuple(got)} but config.json implies "
                              f"{tuple(shape)}: the weights and config.json disagree")
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(set(stored) - set(expected) - tolerated)
    if extra:
        raise ConfigError(f"the weights hold {extra[0]} (and {len(extra) - 1} more) that "
                          f"config.json does not describe: the weights and config.json disagree")
    return stored


def hf_to_mcore(hf_dir, out, dtype: str = "auto", model_type: str = "auto",
                force: bool = False) -> Path:
    """Convert a transformers save_pretrained directory into a remax-megatron checkpoint."""
    from ..models.builder import dtype_from_name
    from ..runtime.distributed import single_process_runtime

    hf_dir, out = Path(hf_dir), Path(out)
    start = time.time()
    check_apart("--out", out, {"--hf": hf_dir})
    _check_out(out, force)
    hf_config = read_hf_config(hf_dir)
    info = from_hf_config(hf_config)
    reward = _resolve_model_type(info, model_type)
    family = family_module(info.model_type)
    weights = open_hf_weights(hf_dir)
    stored = check_weights_match_config(weights, family, info.config, reward)
    params_dtype = weights.floating_dtype() if dtype == "auto" else dtype_from_name(dtype)
    if params_dtype not in DTYPE_NAMES:
        raise ConfigError(f"the weights are {params_dtype}: pass --dtype fp32, bf16 or fp16")
    if not has_tokenizer([p.name for p in hf_dir.iterdir()]):
        log.warning("%s has no tokenizer files: the checkpoint will have no tokenizer/ and "
                    "generate/train will need one", hf_dir)

    with single_process_runtime():
        _write_converted(weights, stored, family, info, hf_config, reward, params_dtype, hf_dir, out)
    log.info("converted %s (%s, %s) -> %s in %.1fs, peak RSS %.2f GiB", hf_dir, info.architecture,
             DTYPE_NAMES[params_dtype], out, time.time() - start, _peak_rss_gib())
    return out


def _write_converted(weights, stored, family, info, hf_config, reward, params_dtype, hf_dir,
                     out) -> None:
    from ..models.builder import build_model, unwrap

    tmp = tmp_sibling(out)
    try:
        model = unwrap(build_model(info.config, reward=reward, params_dtype=params_dtype,
                                   spec="local", perform_initialization=False))
        tensors = rules.to_mcore(family.rules(info.config, reward),
                                 lambda n: weights.get(stored[n]))
        save_full_weights(model, tensors, tmp / WEIGHTS_DIR)
        meta = CheckpointMeta(kind="reward" if reward else "policy", architecture=info.architecture,
                              model_type=info.model_type, dtype=DTYPE_NAMES[params_dtype],
                              vocab_size=info.config.vocab_size, source=str(hf_dir.resolve()))
        write_checkpoint_files(tmp, meta, info.config, hf_config)
        copy_files(hf_dir, tmp / TOKENIZER_DIR)
        copy_files(hf_dir, tmp, [GENERATION_CONFIG])
        write_checksums(tmp, digest(tmp, listed_files(tmp)))
        replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mcore_to_hf(load, out, force: bool = False, max_shard_gib: float = 2.0) -> Path:
    """Export a remax-megatron checkpoint (converted or trained, any tp/pp) to transformers.
    ``load`` may also be a training run directory, its checkpoints/ or checkpoints/latest."""
    from ..runtime.distributed import single_process_runtime

    out = Path(out)
    start = time.time()
    named, load = load, resolve_checkpoint(load, "--load")
    read_checkpoint(load)  # its one-line errors before any process group starts
    # --out may lie in the run directory --load names (OUTPUT/hf), never in the checkpoint
    check_apart("--out", out, {"--load": load})
    if overlap(out, named) in ("is", "contains"):  # the run directory --load names
        check_apart("--out", out, {"--load": named})
    _check_out(out, force)
    with single_process_runtime():
        meta = _write_exported(load, out, max_shard_gib)
    log.info("exported %s -> %s (%s) in %.1fs, peak RSS %.2f GiB", load, out, meta.architecture,
             time.time() - start, _peak_rss_gib())
    return out


def _write_exported(load, out: Path, max_shard_gib: float) -> CheckpointMeta:
    from ..models.builder import dtype_from_name, unwrap
    from ..models.sharding import VOCAB_PARAMS

    tmp = None
    try:
        model, ckpt = load_model(load, spec="local")
        model = unwrap(model)
        config, meta = ckpt.config, ckpt.meta
        info = HFModelInfo(config=config, architecture=meta.architecture,
                           model_type=meta.model_type, is_reward=meta.is_reward)
        family = family_module(meta.model_type)
        params = dict(model.named_parameters())

        # megatron keeps some modules (position embeddings, torch norms) in fp32 whatever
        # params_dtype says; they hold values of the checkpoint's dtype, so the cast is exact.
        dtype = dtype_from_name(meta.dtype)

        def get(name: str) -> torch.Tensor:
            t = params[name].detach()
            return (t[:config.vocab_size] if name in VOCAB_PARAMS else t).to(dtype)

        plan = {n: (s, dtype) for n, s in
                rules.planned_shapes(family, config, meta.is_reward).items()}
        tmp = tmp_sibling(out)
        writer = ShardedSafetensorsWriter(tmp, plan, int(max_shard_gib * 2**30))
        for name, tensor in rules.to_hf(family.rules(config, meta.is_reward), get):
            writer.add(name, tensor)
        writer.finish()
        hf_config = dict(ckpt.hf_config or to_hf_config(info))
        hf_config.update(architectures=[meta.architecture], dtype=str(dtype).replace("torch.", ""))
        if "torch_dtype" in hf_config:  # transformers < 5 spelling
            hf_config["torch_dtype"] = hf_config["dtype"]
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if ckpt.tokenizer_dir is not None:
            copy_files(ckpt.tokenizer_dir, tmp)
        copy_files(ckpt.path, tmp, [GENERATION_CONFIG])
        replace_directory(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
