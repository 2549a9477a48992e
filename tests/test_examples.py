"""The example configs parse (every key known, every value typed) and are valid layouts."""

from pathlib import Path

import pytest

from remax_megatron.runtime.layout import validate_layout
from remax_megatron.training.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/config.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_config_parses(path):
    cfg = load_config(str(path), [])
    assert cfg.policy.load and cfg.reward.load and cfg.data.path
    world = {"gpt2_124m": 8, "llama2_7b": 16, "qwen3_moe": 16}[path.parent.name]  # 8-GPU nodes
    validate_layout(world, cfg.parallel.tp, cfg.parallel.pp, ep=cfg.parallel.ep)
    validate_layout(world, cfg.reward.tp, cfg.reward.pp)
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    assert cfg.train.global_batch_size % (dp * cfg.train.micro_batch_size) == 0


def test_there_are_examples():
    assert {p.parent.name for p in EXAMPLES} == {"gpt2_124m", "llama2_7b", "qwen3_moe"}


FINETUNE = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/sft.yaml")) + sorted(
    (Path(__file__).resolve().parents[1] / "examples").glob("*/reward_model.yaml"))


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pipeline_configs_parse(path):
    """The SFT and reward-model steps: every key known, a layout that fits 8-GPU nodes."""
    from remax_megatron.training.finetune_config import (
        RMConfig, SFTConfig, load_finetune_config,
    )

    cfg = load_finetune_config(SFTConfig if path.stem == "sft" else RMConfig, str(path), [])
    layout = validate_layout(8, cfg.parallel.tp, cfg.parallel.pp)
    assert cfg.train.global_batch_size % (layout.dp * cfg.train.micro_batch_size) == 0
    assert len(FINETUNE) == 2
