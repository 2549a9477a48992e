"""RoPE scaling: our inverse frequencies equal transformers' for llama3 and linear configs (old
and new config.json formats), round-trip through export, and unsupported kinds fail in one line."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from remax_megatron.config_io import ConfigError
from remax_megatron.models.config import ModelConfig
from remax_megatron.models.hf_config import from_hf_config, to_hf_config
from remax_megatron.models.rope import hf_rope_scaling, scaled_inv_freq

HEAD_DIM = 64
SHAPE = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 128,
         "max_position_embeddings": 131072}


def plain_inv_freq(theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
CASES = [
    (500000.0, LLAMA31),  # Llama 3.1 / 3.3
    (500000.0, {**LLAMA31, "factor": 32.0}),  # Llama 3.2
    (10000.0, {**LLAMA31, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 512}),  # values megatron's option cannot take
    (10000.0, {"rope_type": "linear", "factor": 2.5}),
]


@pytest.mark.parametrize("theta,scaling", CASES)
def test_inverse_frequencies_equal_transformers(theta, scaling):
    config = transformers.LlamaConfig(**SHAPE, rope_parameters={"rope_theta": theta, **scaling})
    expected, attention_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    assert attention_scale == 1.0
    ours = scaled_inv_freq(plain_inv_freq(theta), hf_rope_scaling(config.to_dict())[1])
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert not torch.equal(ours, plain_inv_freq(theta))  # the case really scales


def test_old_config_format_and_export_round_trip():
    old = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE,
           "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **{
               k: v for k, v in LLAMA31.items() if k != "rope_type"}}}
    info = from_hf_config(old)
    assert info.config.rope_theta == 500000.0 and info.config.rope_scaling == LLAMA31
    exported = to_hf_config(info)
    assert exported["rope_parameters"] == {"rope_theta": 500000.0, **LLAMA31}
    rebuilt = transformers.AutoConfig.for_model(**exported).to_dict()
    assert from_hf_config(rebuilt) == info


def test_plain_rope_has_no_scaling():
    assert hf_rope_scaling({"rope_theta": 5.0}) == (5.0, None)
    assert hf_rope_scaling({"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}) == (
        7.0, None)
    assert torch.equal(scaled_inv_freq(plain_inv_freq(10.0), None), plain_inv_freq(10.0))


@pytest.mark.parametrize("params,needle", [
    ({"rope_type": "dynamic", "factor": 2.0}, "RoPE scaling 'dynamic' is not supported"),
    ({**LLAMA31, "attention_factor": 0.5}, "keys this package does not apply: attention_factor"),
    ({**LLAMA31, "factor": "8"}, "needs numeric factor"),
    ({**LLAMA31, "high_freq_factor": 1.0}, "high_freq_factor > low_freq_factor"),
])
def test_unsupported_scaling_is_one_line(params, needle):
    with pytest.raises(ConfigError) as err:
        hf_rope_scaling({"rope_parameters": {"rope_theta": 1e4, **params}})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_model_config_checks_scaling():
    kw = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100,
          "max_position_embeddings": 64}
    with pytest.raises(ConfigError, match="needs position_embedding=rope"):
        ModelConfig.gpt2(**kw, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="'ntk' is not supported"):
        ModelConfig.llama(**kw, ffn_hidden_size=96, rope_scaling={"rope_type": "ntk"})
