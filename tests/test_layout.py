"""Layout validation: every impossible layout fails before anything is built, with one line that
says what to change."""

import pytest

from remax_megatron.config_io import ConfigError
from remax_megatron.models.config import ModelConfig
from remax_megatron.runtime.layout import LayoutError, validate_layout


def llama(**kw):
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                ffn_hidden_size=96, vocab_size=100, max_position_embeddings=64)
    base.update(kw)
    return ModelConfig.llama(**base)


def test_valid_layout_derives_dp():
    layout = validate_layout(8, tp=2, pp=2, model=llama())
    assert (layout.tp, layout.pp, layout.dp) == (2, 2, 2)
    assert str(layout) == "tp=2 pp=2 dp=2 (world size 8)"


@pytest.mark.parametrize("world,tp,pp,model,needle", [
    (6, 4, 1, None, "world size 6 is not divisible by tp*pp=4*1=4: launch a multiple of 4 ranks "
                    "or choose tp*pp among 1, 2, 3, 6"),
    (4, 4, 1, llama(num_attention_heads=6, hidden_size=48, num_key_value_heads=6),
     "model has 6 attention heads, not divisible by tp=4: choose tp among 1, 2, 3, 6"),
    (4, 4, 1, llama(), "model has 2 key/value heads, not divisible by tp=4: choose tp among 1, 2"),
    (3, 1, 3, llama(), "model has 4 layers, not divisible by pp=3: choose pp among 1, 2, 4"),
    (2, 2, 1, llama(ffn_hidden_size=97),
     "model ffn_hidden_size=97 is not divisible by tp=2: choose tp among 1, 97"),
    (2, 0, 1, None, "tp must be a positive integer, got 0"),
])
def test_impossible_layouts(world, tp, pp, model, needle):
    with pytest.raises(LayoutError) as err:
        validate_layout(world, tp, pp, model)
    message = str(err.value)
    assert message == needle
    assert "\n" not in message


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"model.hidden_size=70 is not divisible by "
                                          r"num_attention_heads=8: change one, or set head_dim"):
        llama(hidden_size=70)


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads=3: GQA needs whole groups"):
        llama(num_key_value_heads=3)


def test_unknown_family():
    with pytest.raises(ConfigError, match=r"model.family='bert' is not supported; use one of: "
                                          r"gpt2, llama"):
        ModelConfig(family="bert", num_layers=2, hidden_size=8, num_attention_heads=2,
                    ffn_hidden_size=8, vocab_size=10, max_position_embeddings=8)


def test_backend_choice():
    from remax_megatron.runtime.distributed import choose_backend

    assert choose_backend("auto", cuda_available=True) == "nccl"
    assert choose_backend("auto", cuda_available=False) == "gloo"
    for requested, cuda, needle in (("nccl", False, "needs CUDA GPUs"),
                                    ("gloo", True, "CUDA_VISIBLE_DEVICES="),
                                    ("mpi", False, "backend 'mpi' is unknown")):
        with pytest.raises(LayoutError, match=needle):
            choose_backend(requested, cuda_available=cuda)


MOE = ModelConfig.llama(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                        vocab_size=100, max_position_embeddings=64, num_experts=4,
                        moe_ffn_hidden_size=48)


def test_expert_parallel_layout():
    layout = validate_layout(8, 2, 1, MOE, ep=2)
    assert (layout.dp, layout.ep) == (4, 2) and "ep=2" in str(layout)


@pytest.mark.parametrize("world,tp,ep,model,needle", [
    (4, 2, 4, MOE, "ep=4 does not divide the data-parallel size dp=2 (world size 4 / (tp*pp=2)): "
                   "choose ep among 1, 2"),
    (6, 1, 3, MOE, "has 4 experts, not divisible by ep=3: choose ep among 1, 2, 4"),
    (2, 1, 2, MOE.replace(num_experts=None, moe_ffn_hidden_size=None),
     "ep=2 needs a mixture-of-experts model: set ep=1"),
    (4, 4, 1, MOE.replace(moe_ffn_hidden_size=50), "moe_ffn_hidden_size=50 is not divisible by "
                                                   "tp=4"),
])
def test_impossible_expert_layouts(world, tp, ep, model, needle):
    with pytest.raises(LayoutError) as err:
        validate_layout(world, tp, 1, model, ep=ep)
    assert needle in str(err.value)


@pytest.mark.parametrize("changes,needle", [
    (dict(num_experts=None), "model.moe_ffn_hidden_size needs model.num_experts"),
    (dict(moe_topk=5), "moe_topk=5 exceeds num_experts=4"),
    (dict(moe_shared_expert_gate=True), "moe_shared_expert_gate needs "
                                        "moe_shared_expert_ffn_hidden_size"),
    (dict(moe_aux_loss_coef=float("inf")), "moe_aux_loss_coef must be a finite number >= 0"),
    (dict(activation="gelu", family="gpt2"), "mixture-of-experts models need activation=swiglu"),
])
def test_bad_expert_settings(changes, needle):
    with pytest.raises(ConfigError) as err:
        MOE.replace(**changes)
    assert needle in str(err.value)
