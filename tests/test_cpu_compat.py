"""The CPU compatibility layer, each check in a fresh process (it changes torch.cuda globally)."""

import json

import pytest

from conftest import WORKERS, run_python

PROBE = str(WORKERS / "cpu_compat_probe.py")


def probe(*args) -> dict:
    return json.loads(run_python([PROBE, *args]).stdout.strip().splitlines()[-1])


def test_installs_once_and_redirects_cuda_to_cpu():
    out = probe()
    assert out["installed"] and out["installed_again"]
    assert out["log_lines"] == 1, "the layer must announce itself exactly once"
    for key in ("zeros_cuda", "empty_current_device", "to_cuda", "to_device_cuda",
                "thread_zeros_cuda"):
        assert out[key] == "cpu", key
    assert out["cuda_is_noop"] and out["streams_events"] and out["type_convert"]
    assert out["type_fp32"] == "torch.cuda.FloatTensor"
    assert out["type_bf16"] == "torch.cuda.BFloat16Tensor"


def test_megatron_rng_tracker_runs_on_the_cpu_generator():
    out = probe()
    assert out["fork_restores_default_stream"]
    assert out["fork_stream_is_seeded"]
    assert out["fork_stream_differs_from_default"]


def test_strict_noop_when_cuda_is_available():
    out = probe("--pretend-cuda")
    assert out == {"installed": False, "current_device_untouched": True, "mode_stack": 0}


def test_decode_loop_runs_without_the_torch_function_mode(megatron_runtime, monkeypatch):
    """The CPU layer intercepts every torch call made under it; generate suspends it (a decode
    step makes thousands of calls), re-entering it only where megatron asks for CUDA (its RoPE
    table). The tokens are checked against transformers in test_generation.py."""
    import torch

    from remax_megatron.models.builder import build_policy
    from remax_megatron.models.config import ModelConfig
    from remax_megatron.rollout.engine import generate
    from remax_megatron.runtime import cpu_compat

    if not cpu_compat.is_installed():
        pytest.skip("the CPU layer is only installed without CUDA")
    model = build_policy(ModelConfig.llama(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ffn_hidden_size=96, vocab_size=100, max_position_embeddings=64))
    calls = []
    original = type(cpu_compat._mode).__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        calls.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(type(cpu_compat._mode), "__torch_function__", counting)
    ids = torch.randint(0, 100, (4, 8))
    generate(model, ids, torch.ones_like(ids), max_new_tokens=16, vocab_size=100)
    # only the RoPE table (built once) goes through the mode: a few dozen calls, where the
    # 16 decode steps alone made thousands
    assert 0 < len(calls) < 100, len(calls)
