"""Model config: family defaults, YAML round trip, overrides, and the mapping from Hugging Face
config.json for every supported architecture (transformers builds the configs: the reference)."""

import pytest
import transformers

from remax_megatron.config_io import (
    ConfigError, apply_overrides, from_dict, load_yaml, save_yaml, to_dict,
)
from remax_megatron.models.config import ModelConfig
from remax_megatron.models.hf_config import from_hf_config, to_hf_config


def hf_dict(cls, arch, **kw):
    cfg = cls(**kw)
    d = cfg.to_dict()
    d["architectures"] = [arch]
    return d


LLAMA_KW = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                num_hidden_layers=3, vocab_size=101, max_position_embeddings=128, rms_norm_eps=1e-5,
                rope_theta=50000.0)


def test_yaml_round_trip(tmp_path):
    cfg = ModelConfig.llama(num_layers=2, hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2, ffn_hidden_size=96, vocab_size=100,
                            max_position_embeddings=64, rope_theta=500000.0)
    save_yaml(cfg, tmp_path / "model.yaml")
    again = from_dict(ModelConfig, load_yaml(tmp_path / "model.yaml"))
    assert again == cfg
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write left a temporary file"


def test_unknown_key_is_named():
    data = to_dict(ModelConfig.gpt2(num_layers=2, hidden_size=64, num_attention_heads=4,
                                    vocab_size=100, max_position_embeddings=64))
    data["hiden_size"] = 3
    with pytest.raises(ConfigError, match="unknown config key hiden_size; known keys: "):
        from_dict(ModelConfig, data)


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({"model": {"num_layers": 2}},
                           ["model.num_layers=4", "train.lr=1e-6", "train.name=demo",
                            "train.flag=true"])
    assert data == {"model": {"num_layers": 4},
                    "train": {"lr": 1e-6, "name": "demo", "flag": True}}
    with pytest.raises(ConfigError, match="is not key=value"):
        apply_overrides({}, ["model.num_layers"])


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layers: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert "is not valid YAML at line" in str(err.value) and "\n" not in str(err.value)


def test_duplicate_yaml_keys_are_an_error_naming_both_lines(tmp_path):
    # PyYAML alone keeps the last value silently: lr would be 2e-6 here
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 1.0e-6\n  steps: 3\n  lr: 2.0e-6\nlog: {eval_every: 1}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'lr' at lines 2 and 4"):
        load_yaml(path)
    path.write_text("train:\n  lr: 1.0e-6\nlog:\n  lr: 2.0e-6\n")  # the same name in two sections
    assert load_yaml(path) == {"train": {"lr": 1e-6}, "log": {"lr": 2e-6}}


def test_padded_vocab():
    cfg = ModelConfig.gpt2(num_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=50257,
                           max_position_embeddings=8)
    assert cfg.padded_vocab_size(1) == 50304  # megatron's GPT-2 figure
    assert cfg.padded_vocab_size(2) == 50432  # multiple of 128 * 2
    assert cfg.padded_vocab_size(8) % 1024 == 0


def test_gpt2_mapping():
    info = from_hf_config(hf_dict(transformers.GPT2Config, "GPT2LMHeadModel", n_embd=64, n_layer=3,
                                  n_head=4, vocab_size=101, n_positions=96))
    c = info.config
    assert (info.model_type, info.is_reward) == ("gpt2", False)
    assert (c.family, c.norm, c.activation, c.position_embedding) == (
        "gpt2", "layernorm", "gelu_tanh", "learned")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.ffn_hidden_size) == (3, 64, 4, 256)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (101, 96, True)
    assert c.add_bias_linear and c.add_qkv_bias and c.num_query_groups == 4


def test_llama_mapping_gqa_untied():
    info = from_hf_config(hf_dict(transformers.LlamaConfig, "LlamaForCausalLM", **LLAMA_KW))
    c = info.config
    assert (c.family, c.norm, c.activation, c.position_embedding) == (
        "llama", "rmsnorm", "swiglu", "rope")
    assert (c.num_query_groups, c.kv_channels, c.ffn_hidden_size) == (2, 16, 96)
    assert (c.norm_epsilon, c.rope_theta, c.tie_word_embeddings) == (1e-5, 50000.0, False)
    assert not c.add_bias_linear and not c.add_qkv_bias


def test_llama_tied_and_explicit_head_dim():
    info = from_hf_config(hf_dict(transformers.LlamaConfig, "LlamaForCausalLM",
                                  **{**LLAMA_KW, "tie_word_embeddings": True, "head_dim": 32}))
    assert info.config.tie_word_embeddings and info.config.kv_channels == 32


def test_qwen2_has_qkv_bias_mistral_does_not():
    qwen = from_hf_config(hf_dict(transformers.Qwen2Config, "Qwen2ForCausalLM", **LLAMA_KW))
    assert qwen.config.add_qkv_bias and not qwen.config.add_bias_linear
    mistral = from_hf_config(hf_dict(transformers.MistralConfig, "MistralForCausalLM",
                                     **{**LLAMA_KW, "sliding_window": None}))
    assert not mistral.config.add_qkv_bias and mistral.model_type == "mistral"


@pytest.mark.parametrize("cls,arch,kw", [
    (transformers.GPT2Config, "GPT2ForSequenceClassification",
     dict(n_embd=64, n_layer=2, n_head=4, vocab_size=101, num_labels=1)),
    (transformers.LlamaConfig, "LlamaForSequenceClassification", {**LLAMA_KW, "num_labels": 1}),
])
def test_reward_models(cls, arch, kw):
    info = from_hf_config(hf_dict(cls, arch, **kw))
    assert info.is_reward and info.architecture == arch


def test_qwen3_has_qk_norms_and_its_own_head_dim():
    info = from_hf_config(hf_dict(transformers.Qwen3Config, "Qwen3ForCausalLM",
                                  **{**LLAMA_KW, "head_dim": 40}))
    assert info.config.qk_norm and info.config.kv_channels == 40
    assert not info.config.add_qkv_bias and not info.config.is_moe
    assert from_hf_config(hf_dict(transformers.Qwen3Config, "Qwen3ForSequenceClassification",
                                  **LLAMA_KW, num_labels=1)).is_reward


QWEN_MOE_KW = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.mark.parametrize("arch,cls,kw,expected", [
    # Mixtral: softmax, top-2, renormalized; experts of intermediate_size
    ("MixtralForCausalLM", transformers.MixtralConfig, dict(num_local_experts=8),
     dict(num_experts=8, moe_topk=2, moe_renormalize=True, expert_ffn_hidden_size=96,
          moe_shared_expert_ffn_hidden_size=None, qk_norm=False)),
    ("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig, {**QWEN_MOE_KW, "norm_topk_prob": True},
     dict(num_experts=8, moe_renormalize=True, expert_ffn_hidden_size=32, qk_norm=True)),
    ("Qwen2MoeForCausalLM", transformers.Qwen2MoeConfig,
     {**QWEN_MOE_KW, "shared_expert_intermediate_size": 48},
     dict(moe_renormalize=False, moe_shared_expert_ffn_hidden_size=48,
          moe_shared_expert_gate=True, add_qkv_bias=True)),
])
def test_mixture_of_experts_mapping(arch, cls, kw, expected):
    hf = hf_dict(cls, arch, **LLAMA_KW, router_aux_loss_coef=0.02, **kw)
    config = from_hf_config(hf).config
    assert config.is_moe and config.moe_aux_loss_coef == 0.02
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("arch,cls,kw", [
    ("GPT2LMHeadModel", transformers.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4)),
    ("LlamaForCausalLM", transformers.LlamaConfig, LLAMA_KW),
    ("Qwen2ForCausalLM", transformers.Qwen2Config, LLAMA_KW),
    ("Qwen3ForCausalLM", transformers.Qwen3Config, {**LLAMA_KW, "head_dim": 40}),
    ("Qwen3ForSequenceClassification", transformers.Qwen3Config, {**LLAMA_KW, "num_labels": 1}),
    ("MixtralForCausalLM", transformers.MixtralConfig, {**LLAMA_KW, "num_local_experts": 4}),
    ("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig, {**LLAMA_KW, **QWEN_MOE_KW}),
    ("Qwen2MoeForCausalLM", transformers.Qwen2MoeConfig,
     {**LLAMA_KW, **QWEN_MOE_KW, "shared_expert_intermediate_size": 48}),
    ("LlamaForSequenceClassification", transformers.LlamaConfig, {**LLAMA_KW, "num_labels": 1}),
])
def test_round_trip_through_transformers(arch, cls, kw):
    info = from_hf_config(hf_dict(cls, arch, **kw))
    rebuilt = transformers.AutoConfig.for_model(**to_hf_config(info)).to_dict()
    assert from_hf_config(rebuilt) == info


@pytest.mark.parametrize("hf,needle", [
    ({"architectures": ["BertForMaskedLM"]}, "architecture BertForMaskedLM is not supported: use "
                                             "one of GPT2LMHeadModel, LlamaForCausalLM"),
    ({}, "config.json has no 'architectures' entry"),
    ({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}, "lacks 'num_attention_heads'"),
    ({**hf_dict(transformers.LlamaConfig, "LlamaForSequenceClassification", **LLAMA_KW),
      "num_labels": 2}, "num_labels=2: a reward model needs exactly 1"),
    ({**hf_dict(transformers.LlamaConfig, "LlamaForCausalLM", **LLAMA_KW),
      "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0}},
     "RoPE scaling 'yarn' is not supported: use one of linear, llama3"),
    ({**hf_dict(transformers.LlamaConfig, "LlamaForCausalLM", **LLAMA_KW),
      "attention_bias": True}, "attention_bias=true is not supported for llama"),
    ({**hf_dict(transformers.Qwen3MoeConfig, "Qwen3MoeForCausalLM", **LLAMA_KW, **QWEN_MOE_KW),
      "mlp_only_layers": [1]}, "every layer must be a mixture of experts"),
    ({**hf_dict(transformers.MixtralConfig, "MixtralForCausalLM", **LLAMA_KW,
                num_local_experts=4), "router_jitter_noise": 0.1},
     "router_jitter_noise is not supported: set it 0"),
])
def test_unsupported_configs(hf, needle):
    with pytest.raises(ConfigError) as err:
        from_hf_config(hf)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_yaml_reads_exponent_floats_and_checks_types(tmp_path):
    path = tmp_path / "model.yaml"
    data = to_dict(ModelConfig.gpt2(num_layers=2, hidden_size=64, num_attention_heads=4,
                                    vocab_size=100, max_position_embeddings=64))
    save_yaml(data, path)
    text = path.read_text().replace("norm_epsilon: 1.0e-05", "norm_epsilon: 1e-5")
    path.write_text(text)
    assert from_dict(ModelConfig, load_yaml(path)).norm_epsilon == 1e-5
    with pytest.raises(ConfigError, match="num_layers must be int, got 'four'"):
        from_dict(ModelConfig, {**data, "num_layers": "four"})


def test_null_where_a_value_is_needed(tmp_path):
    from remax_megatron.training import demo
    from remax_megatron.training.config import load_config

    # a TypeError deep in the trainer before (issue 18)
    with pytest.raises(ConfigError, match=r"^output_dir is null: give it a value \(its default "
                                          r"is 'runs/remax'\), or remove the key$"):
        load_config(None, ["output_dir=null"], base=demo.config())
    path = tmp_path / "run.yaml"
    path.write_text("log:\n  # eval_every: 5\ntrain:\n  lr: 1.0e-5\n")  # an empty section
    cfg, demo_cfg = load_config(str(path), [], base=demo.config()), load_config(None, [], demo.config())
    assert cfg.log == demo_cfg.log and cfg.train.lr == 1e-5
    assert load_config(None, ["policy.tokenizer=null"], base=demo.config()).policy.tokenizer is None
