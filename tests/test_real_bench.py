"""tools/bench_algorithms.py --model smollm2 --quick: the real-model comparison's smoke run
(its own file, so that pytest-xdist runs it beside test_real_model.py)."""

from __future__ import annotations

import pytest

from conftest import SMOLLM2_SKIP, read_json, run_python, smollm2_missing

pytestmark = [pytest.mark.real, pytest.mark.skipif(bool(smollm2_missing()), reason=SMOLLM2_SKIP)]


def test_quick_benchmark_on_the_real_model(smollm2_dir, tmp_path):
    """The comparison's smoke run: every algorithm, the variance, the table and the plot."""
    proc = run_python(["tools/bench_algorithms.py", "--model", "smollm2", "--quick",
                       "--smollm2-dir", str(smollm2_dir), "--out", str(tmp_path)],
                      timeout=600)
    results = read_json(tmp_path / "results.json")
    assert set(results["runs"]) == {"remax", "remax_n4", "grpo_n4", "rloo_n4", "reinforce", "ppo"}
    for label, run in results["runs"].items():
        assert [e["step"] for e in run["evals"]] == [0, 1], label
        assert run["times"]["time/step"] > 0 and run["peak_rss_gib"] > 0
    # the models each holds: PPO a critic and (KL 0.1 in its reward) a reference; GRPO the
    # reference of its KL loss; ReMax the reference of the example's KL penalty, and no critic
    held = {label: set(run["states"]) for label, run in results["runs"].items()}
    assert held["ppo"] == {"policy", "critic", "reference"}
    assert held["grpo_n4"] == {"policy", "reference"}
    assert held["remax"] == held["remax_n4"] == {"policy", "reference"}
    assert set(results["variance"]) == {"remax", "reinforce"}
    assert (tmp_path / "algorithms.png").stat().st_size > 10000
    assert "ReMax / REINFORCE" in proc.stdout
