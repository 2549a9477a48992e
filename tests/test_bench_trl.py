"""tools/bench_trl.py runs end to end (--quick: a tiny GPT-2 shape, two steps) and reports our
GRPO's step time and peak memory; TRL's side too when trl is importable here (it is an optional
extra, `.[bench]`: without it the benchmark times ours alone and says so)."""

import importlib.util
import json
import sys

from conftest import run_python


def test_quick_benchmark_times_ours_and_trl_when_present(tmp_path):
    proc = run_python(["tools/bench_trl.py", "--quick", "--steps", "2", "--threads", "1",
                       "--algorithms", "grpo", "--trl-python", sys.executable,
                       "--out", str(tmp_path)], timeout=300)
    results = json.loads((tmp_path / "results.json").read_text())
    with_trl = importlib.util.find_spec("trl") is not None
    assert set(results["runs"]) == ({"ours grpo", "TRL grpo"} if with_trl else {"ours grpo"})
    for run in results["runs"].values():
        for clock in ("step_seconds", "step_cpu_seconds"):
            assert len(run[clock]) == 2 and all(t > 0 for t in run[clock]), (clock, run)
        assert run["peak_rss_gib"] > 0 and len(run["reward"]) == 2
    assert "ours grpo" in proc.stdout
    if with_trl:
        assert "grpo wall time per step:" in proc.stdout
    else:
        assert "TRL is not importable" in proc.stdout
