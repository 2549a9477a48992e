"""Training configs: YAML + overrides, and every bad config failing with one line before any
process group or model is built."""

from __future__ import annotations

import json

import pytest
import torch

from remax_megatron import tiny
from remax_megatron.config_io import ConfigError, save_yaml
from remax_megatron.convert.commands import hf_to_mcore
from remax_megatron.training import demo
from remax_megatron.training.config import load_config
from remax_megatron.training.trainer import Trainer




def fails(cfg, needle):
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_and_overrides_layer_on_the_demo(tmp_path):
    path = tmp_path / "run.yaml"
    save_yaml({"train": {"lr": 1e-5}, "rollout": {"max_new_tokens": 8}}, path)
    cfg = load_config(str(path), ["train.steps=3", "algorithm.loss_reduction=token_mean"],
                      base=demo.config())
    assert (cfg.train.lr, cfg.train.steps, cfg.rollout.max_new_tokens) == (1e-5, 3, 8)
    assert cfg.algorithm.loss_reduction == "token_mean"
    assert cfg.policy.model.num_layers == 2  # from the demo base


def test_unknown_key(nothing_built):
    with pytest.raises(ConfigError, match=r"unknown config key train.learning_rate; known keys "
                                          r"under train: adam_beta1"):
        load_config(None, ["train.learning_rate=1e-6"], base=demo.config())


def test_missing_checkpoint(nothing_built, tmp_path):
    cfg = load_config(None, [f"policy.load={tmp_path}/nope", "policy.model=null"],
                      base=demo.config())
    fails(cfg, f"policy.load={tmp_path}/nope does not exist: convert your HF model")


def test_batch_not_divisible_by_dp_times_micro_batch(nothing_built):
    cfg = load_config(None, ["train.global_batch_size=30", "train.micro_batch_size=16"],
                      base=demo.config())
    fails(cfg, "train.global_batch_size=30 is not divisible by dp x micro_batch_size = 1 x 16")


def test_impossible_layout(nothing_built):
    cfg = load_config(None, ["parallel.tp=3"], base=demo.config())
    fails(cfg, "world size 1 is not divisible by tp*pp=3*1=3")


def test_tokenizer_that_does_not_fit_the_checkpoint(nothing_built, tmp_path):
    small = tiny.build_tokenizer(200)
    big = tiny.build_tokenizer(300)
    model = tiny.build_hf_model("LlamaForCausalLM", len(small), num_hidden_layers=1)
    ckpt = hf_to_mcore(tiny.save_hf(model, small, tmp_path / "hf"), tmp_path / "ckpt")
    big.save_pretrained(tmp_path / "big_tok")
    cfg = load_config(None, [f"policy.load={ckpt}", "policy.model=null",
                             "policy.builtin_tokenizer=false",
                             f"policy.tokenizer={tmp_path / 'big_tok'}"], base=demo.config())
    fails(cfg, f"has {len(big)} ids but the model's vocabulary has {len(small)}")


def test_missing_data_file_and_bad_rule(nothing_built, tmp_path):
    cfg = load_config(None, ["data.builtin=false", f"data.path={tmp_path}/p.jsonl"],
                      base=demo.config())
    fails(cfg, f"data.path={tmp_path}/p.jsonl does not exist")
    cfg = load_config(None, ["reward.rule=no_such_module:f"], base=demo.config())
    fails(cfg, "reward.rule: cannot import no_such_module")


def test_prompts_longer_than_the_limit_are_dropped_and_counted(nothing_built, tmp_path):
    rows = [{"prompt": "hi"}] * 40 + [{"prompt": "word " * 80}] * 3
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["data.builtin=false", f"data.path={tmp_path / 'p.jsonl'}",
                             "data.max_prompt_length=16", "train.global_batch_size=64"],
                      base=demo.config())
    fails(cfg, "only 40 prompts fit data.max_prompt_length=16, fewer than "
               "train.global_batch_size=64")


def test_cli_bad_config_is_one_line(tmp_path):
    from conftest import run_python

    proc = run_python(["-m", "remax_megatron", "train", "--output-dir", str(tmp_path / "run"),
                       "train.global_batch_size=30", "train.micro_batch_size=16"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("remax-megatron train: error: "
                                                           "train.global_batch_size=30")
    assert "runtime:" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,needle", [
    ("rollout.temperature=0.0", "rollout: temperature=0.0 must be in (0, 100]"),
    ("rollout.temperature=.inf", "rollout: temperature=inf must be in (0, 100]"),
    ("reward.micro_batch_size=0", "reward.micro_batch_size=0 must be at least 1"),
    ("rollout.pipeline_micro_batches=-1", "rollout.pipeline_micro_batches=-1 must be >= 0"),
    ("policy.tokenizer=/nowhere", "policy.tokenizer=/nowhere is not a directory"),
    # every number a run reads, checked for its range (NaN included)
    ("train.lr=-1e-5", "train.lr=-1e-05 must be a learning rate in [0, 1]"),
    ("train.lr=.nan", "train.lr=nan must be a learning rate in [0, 1]"),
    ("train.lr=.inf", "train.lr=inf must be a learning rate in [0, 1]"),
    ("train.lr=1e30", "train.lr=1e+30 must be a learning rate in [0, 1]"),
    ("train.min_lr=1.0", "train.min_lr=1.0 must be in [0, train.lr=0.01]"),
    ("train.min_lr=-1e-3", "train.min_lr=-0.001 must be in [0, train.lr=0.01]"),
    ("train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be >= 0"),
    ("train.adam_beta1=1.0", "train.adam_beta1=1.0 must be in [0, 1)"),
    ("train.adam_beta2=-0.5", "train.adam_beta2=-0.5 must be in [0, 1)"),
    ("train.adam_beta2=.nan", "train.adam_beta2=nan must be in [0, 1)"),
    ("train.clip_grad=-1", "train.clip_grad=-1.0 must be >= 0 (0: no clipping)"),
    ("train.epochs=0", "train.epochs=0.0 must be a positive number"),
    ("train.global_batch_size=0", "train.global_batch_size=0 must be >= 1"),
    ("train.seed=-3", "train.seed=-3 must be in [0, 2**63 - 1]"),
    ("train.seed=99999999999999999999", "train.seed=99999999999999999999 must be in [0, 2**63"),
    ("train.steps=0", "train.steps=0 must be at least 1"),
    ("train.dtype=fp16", "train.dtype=fp16 needs a GPU (CPUs have no fp16 matmul kernels)"),
    ("train.dtype=fp8", "train.dtype='fp8': use auto, fp32, bf16 or fp16"),
    ("checkpoint.save_every=-2", "checkpoint.save_every=-2 must be >= 0 (0: only at the end)"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1 must be >= 0 (0: keep every one)"),
    ("log.samples_every=-1", "log.samples_every=-1 must be >= 0"),
    ("log.samples=0", "log.samples=0 must be >= 1"),
    ("log.eval_every=5", "log.eval_every=5 needs data.eval_path"),
    ("log.eval_every=-5", "log.eval_every=-5 must be >= 0"),
    ("data.eval_path=/nowhere.jsonl", "data.eval_path=/nowhere.jsonl does not exist"),
    ("data.max_prompt_length=0", "data.max_prompt_length=0 must be at least 1"),
    ("rollout.top_k=-1", "rollout.top_k=-1 must be >= 0"),
    ("rollout.top_p=1.5", "rollout: top_p=1.5"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0 must be at least 1"),
    ("reward.tp=0", "reward.tp=0 must be >= 1"),
    ("parallel.backend=mpi", "parallel.backend='mpi': use auto, nccl or gloo"),
    ("parallel.tp=3", "world size 1 is not divisible by tp*pp=3*1=3"),
    ("reward.pp=2", "world size 1 is not divisible by reward.tp*reward.pp=1*2=2: launch a "
                    "multiple of 2 ranks or choose reward.tp*reward.pp among 1"),
    ("reward.rule=nomodule_xyz:f", "reward.rule: cannot import nomodule_xyz"),
])
def test_more_bad_values(nothing_built, override, needle):
    fails(load_config(None, [override], base=demo.config()), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU without bf16 kernels")
def test_bf16_on_a_cpu_without_bf16_kernels(nothing_built, monkeypatch):
    from remax_megatron.runtime import precision

    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    fails(load_config(None, ["train.dtype=bf16"], base=demo.config()),
          "train.dtype=bf16: this CPU (it needs AVX512-BF16 or AMX) has no native bf16 support: "
          "use fp32")


@pytest.mark.parametrize("overrides,needle", [
    (["algorithm.name=rloo"], "algorithm.name=rloo needs rollout.n_samples >= 2 (its baseline "
                              "comes from the other samples), got 1"),
    (["algorithm.name=grpo", "rollout.n_samples=1"], "algorithm.name=grpo needs rollout.n_samples"),
    (["critic.lr=1e-5"], "critic.* is set but algorithm.name=remax trains no critic"),
    (["algorithm.name=ppo", "critic.load=/nowhere"], "critic.load=/nowhere does not exist"),
    (["algorithm.name=ppo", "critic.lr=-1.0"], "critic.lr=-1.0 must be a learning rate in [0, 1]"),
    (["algorithm.name=ppo", "critic.lr=1e30"], "critic.lr=1e+30 must be a learning rate in [0, 1]"),
    (["algorithm.name=ppo", "critic.lr=1e-4", "critic.min_lr=1e-3"],
     "the critic's min_lr 0.001 exceeds its lr 0.0001"),
    (["algorithm.name=ppo", "critic.min_lr=.nan"], "critic.min_lr=nan must be a learning rate"),
    (["rollout.n_samples=3", "train.global_batch_size=8", "train.micro_batch_size=16"],
     "each dp rank trains 8 / dp 1 x rollout.n_samples 3 = 24 sequences, not divisible by "
     "train.micro_batch_size 16 x algorithm.mini_batches 1"),
    (["algorithm.name=ppo", "algorithm.mini_batches=3", "train.global_batch_size=8",
      "train.micro_batch_size=4"], "not divisible by train.micro_batch_size 4 x "
                                   "algorithm.mini_batches 3"),
    (["rollout.n_samples=0"], "rollout.n_samples=0 must be at least 1"),
])
def test_algorithm_settings_checked_before_anything_is_built(nothing_built, overrides, needle):
    fails(load_config(None, overrides, base=demo.config()), needle)


@pytest.mark.parametrize("overrides,needle", [
    (["algorithm.name=dpo"], "algorithm.name='dpo' is unknown: use one of remax, ppo"),
    (["algorithm.clip_ratio=0.2"], "algorithm.clip_ratio=0.2 is not an option of "
                                   "algorithm.name=remax"),
    (["algorithm.name=ppo", "algorithm.lam=2"], "algorithm.lam=2.0 must be in [0, 1]"),
])
def test_algorithm_options_fail_while_the_config_loads(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, base=demo.config())
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_critic_from_a_reward_model_with_another_vocabulary(nothing_built, tmp_path):
    tok = tiny.build_tokenizer(200)
    rm = tiny.build_hf_model("LlamaForSequenceClassification", len(tok), num_hidden_layers=1)
    ckpt = hf_to_mcore(tiny.save_hf(rm, tok, tmp_path / "hf"), tmp_path / "rm")
    cfg = load_config(None, ["algorithm.name=ppo", f"critic.load={ckpt}"], base=demo.config())
    fails(cfg, f"critic.load={ckpt} has a vocabulary of {len(tok)} ids, the policy "
               f"{len(demo.tokenizer())}: the critic reads the policy's tokens")


def test_policy_dropout_is_refused(nothing_built):
    cfg = load_config(None, ["policy.model.hidden_dropout=0.1"], base=demo.config())
    fails(cfg, "policy dropout (hidden_dropout=0.1, attention_dropout=0.0) must be 0")


def test_critic_that_cannot_read_the_whole_sequence(nothing_built, tmp_path):
    tok = demo.tokenizer()
    rm = tiny.build_hf_model("LlamaForSequenceClassification", len(tok), num_hidden_layers=1,
                             max_position_embeddings=32)
    ckpt = hf_to_mcore(tiny.save_hf(rm, tok, tmp_path / "hf"), tmp_path / "rm")
    cfg = load_config(None, ["algorithm.name=ppo", f"critic.load={ckpt}"], base=demo.config())
    fails(cfg, "has 32 positions, fewer than data.max_prompt_length + rollout.max_new_tokens = 48")
