"""TP=2, PP=2, TP=2 x PP=2 and DP=2 (plain and distributed optimizer) against the single-rank model:
logits, vocab-parallel log-probs and entropy, loss, gathered gradients and the weights after one
megatron optimizer step, for a GQA Llama, a Qwen3-shaped model (q/k norms), a tied GPT-2 and a
GPT-2 reward model."""

from __future__ import annotations

import pytest
import torch

from conftest import WORKERS, read_json, run_python, run_torchrun

WORKER = str(WORKERS / "parallel_equivalence.py")
TOL = {"outputs": 2e-5, "grads": 2e-5, "weights_after_step": 1e-5, "grad_norm": 1e-4,
       "applied": 0.0, "vp_vs_full": 2e-5}
POLICY_OUTPUTS = ("logits", "log_probs", "entropy", "loss")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference.pt"
    run_python([WORKER, "--reference", str(path)])
    return path


def test_reference_is_not_trivial(reference):
    """The comparisons below mean something: gradients are non-zero, clipping is active and the
    optimizer step moves every trained weight."""
    ref = torch.load(reference, weights_only=False)
    for name, case in ref.items():
        assert case["applied"], name
        assert float(case["grad_norm"]) > 0.05 * 2, f"{name}: clipping (0.05) must be active"
        for key, grad in case["grads"].items():
            assert grad.abs().max() > 0, f"{name}: zero gradient for {key}"
            moved = (case["weights_after_step"][key] - case["full_init"][key]).abs().max()
            assert moved > 1e-4, f"{name}: {key} did not move in the optimizer step"
        assert torch.isfinite(case["outputs"]["loss"])


LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "pp2": (2, ["--pp", "2"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    "dp2": (2, []),
    "dp2_distributed_optimizer": (2, ["--dist-opt"]),
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(layout, reference, tmp_path):
    nproc, extra = LAYOUTS[layout]
    report_path = tmp_path / "report.json"
    run_torchrun(nproc, [WORKER, "--check", str(reference), "--report", str(report_path), *extra])
    report = read_json(report_path)

    for case in ("llama_gqa", "qwen3_qk_norm", "gpt2_tied"):
        for out in POLICY_OUTPUTS:
            assert f"{case}/outputs/{out}" in report, f"{case}: {out} was not compared"
        assert f"{case}/vp_vs_full/log_probs" in report
    assert "gpt2_reward/outputs/scores" in report
    if "distributed_optimizer" not in layout:
        assert any(k.startswith("llama_gqa/grads/") for k in report)
        assert any(k.startswith("qwen3_qk_norm/grads/") and "q_layernorm" in k for k in report)
    assert any(k.startswith("gpt2_tied/weights_after_step/") for k in report)

    failures = {k: v for k, v in report.items() if v > TOL[k.split("/")[1]]}
    assert not failures, f"{layout}: differs from the single-rank model: {failures}"
