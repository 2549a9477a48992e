"""Model builders on one rank: megatron-core layouts of every family, the reward head, vocab
padding, the TransformerConfig mapping, and spec selection."""

import math

import pytest
import torch

from remax_megatron.config_io import ConfigError
from remax_megatron.models.builder import (
    build_policy, build_reward_model, dtype_from_name, resolve_spec, transformer_config,
)
from remax_megatron.models.config import ModelConfig

LLAMA = ModelConfig.llama(num_layers=2, hidden_size=64, num_attention_heads=4,
                          num_key_value_heads=2, ffn_hidden_size=96, vocab_size=100,
                          max_position_embeddings=64)
GPT2 = ModelConfig.gpt2(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=130,
                        max_position_embeddings=64)


def shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_llama_layout(megatron_runtime):
    s = shapes(build_policy(LLAMA))
    assert s["embedding.word_embeddings.weight"] == (128, 64)  # 100 padded to 128
    assert s["output_layer.weight"] == (128, 64)  # untied
    # q heads 4, kv groups 2, head dim 16: (4 + 2*2) * 16 rows
    assert s["decoder.layers.0.self_attention.linear_qkv.weight"] == (128, 64)
    assert s["decoder.layers.0.mlp.linear_fc1.weight"] == (192, 64)  # gate and up
    assert s["decoder.layers.1.mlp.linear_fc2.weight"] == (64, 96)
    assert not any(n.endswith(".bias") for n in s)
    assert "embedding.position_embeddings.weight" not in s  # RoPE


def test_gpt2_layout_tied(megatron_runtime):
    s = shapes(build_policy(GPT2))
    assert s["embedding.word_embeddings.weight"] == (256, 64)  # 130 padded to 256
    assert s["embedding.position_embeddings.weight"] == (64, 64)
    assert "output_layer.weight" not in s  # tied to the word embeddings
    assert s["decoder.layers.0.self_attention.linear_qkv.bias"] == (192,)
    assert s["decoder.layers.0.mlp.linear_fc1.weight"] == (256, 64)


def test_reward_model_scores_every_position(megatron_runtime):
    rm = build_reward_model(LLAMA)
    assert "output_layer.weight" not in shapes(rm) and shapes(rm)["score_head.weight"] == (1, 64)
    ids = torch.randint(0, 100, (3, 7))
    pos = torch.arange(7).expand(3, 7)
    with torch.no_grad():
        scores = rm(ids, pos, None)
    assert scores.shape == (3, 7) and torch.isfinite(scores).all()
    # causal: the score at position 3 does not depend on later tokens
    ids2 = ids.clone()
    ids2[:, 5:] = (ids2[:, 5:] + 1) % 100
    with torch.no_grad():
        scores2 = rm(ids2, pos, None)
    torch.testing.assert_close(scores[:, :5], scores2[:, :5])
    assert not torch.allclose(scores[:, 5:], scores2[:, 5:])


def test_transformer_config_mapping():
    gpt2 = transformer_config(GPT2)
    x = torch.tensor([0.7])
    assert gpt2.normalization == "LayerNorm" and not gpt2.gated_linear_unit
    assert torch.equal(gpt2.activation_func(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert gpt2.add_bias_linear and gpt2.add_qkv_bias and gpt2.layernorm_epsilon == 1e-5
    llama = transformer_config(LLAMA, params_dtype=torch.bfloat16)
    assert llama.normalization == "RMSNorm" and llama.gated_linear_unit
    assert llama.activation_func is torch.nn.functional.silu
    assert llama.num_query_groups == 2 and llama.kv_channels == 16 and llama.bf16
    assert llama.hidden_dropout == 0.0 and llama.attention_dropout == 0.0
    assert math.isclose(llama.layernorm_epsilon, 1e-6)


def test_spec_selection_on_cpu():
    assert resolve_spec("auto") == "local"
    with pytest.raises(ConfigError, match="spec=te needs transformer-engine and a CUDA GPU"):
        resolve_spec("te")
    with pytest.raises(ConfigError, match="layer spec 'fast' is unknown"):
        resolve_spec("fast")
    with pytest.raises(ConfigError, match="dtype 'fp8' is unknown"):
        dtype_from_name("fp8")


def test_uninitialized_models_keep_tensor_parallel_attributes(megatron_runtime):
    """megatron sets partition attributes only while initializing; a model built to be loaded
    from a checkpoint must carry the same ones (they drive the grad-norm sum, among others)."""
    def attrs(model):
        return {n: (getattr(p, "tensor_model_parallel", None), getattr(p, "partition_dim", None),
                    getattr(p, "partition_stride", None)) for n, p in model.named_parameters()}

    for config in (LLAMA, GPT2):
        assert attrs(build_policy(config, perform_initialization=False)) == \
            attrs(build_policy(config, perform_initialization=True))
    assert attrs(build_policy(LLAMA))["decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)
