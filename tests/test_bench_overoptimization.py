"""tools/bench_overoptimization.py runs end to end (--quick: a few pairs and steps): pairs judged
by the gold scorer, a proxy reward model trained on them, ReMax / PPO / GRPO against the proxy
with the gold and proxy rewards and the KL recorded, the table and the PNG."""

import json

import pytest

from conftest import run_python


def test_quick_overoptimization_run_reports_every_algorithm(tmp_path):
    proc = run_python(["tools/bench_overoptimization.py", "--quick", "--out", str(tmp_path)],
                      timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["pairs"] > 0 and 0.0 <= results["proxy"]["eval/accuracy"] <= 1.0
    assert set(results["runs"]) == {"remax", "ppo", "grpo"}
    for run in results["runs"].values():
        rows = run["rows"]
        assert [r["step"] for r in rows] == [0, 1, 2]
        assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.0  # the policy left its reference
        # the same starting policy and held-out prompts: the same gold and proxy reward (the
        # proxy up to rounding: each algorithm scores the prompts in batches of its own size)
        first = results["runs"]["remax"]["rows"][0]
        assert rows[0]["gold"] == pytest.approx(first["gold"])
        assert rows[0]["proxy"] == pytest.approx(first["proxy"], abs=1e-4)
        assert all(0.0 <= r["gold"] <= 1.0 for r in rows)
    assert (tmp_path / "overoptimization.png").stat().st_size > 10000
    assert "| remax |" in proc.stdout and "gold peak" in proc.stdout
