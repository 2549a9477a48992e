"""The CPU compatibility layer, each check in a fresh process (it changes torch.cuda globally)."""

import json

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
