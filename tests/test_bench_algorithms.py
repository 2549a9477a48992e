"""tools/bench_algorithms.py runs end to end (--quick: tiny shapes, few steps) and reports every
algorithm's timing, model-state bytes, gradient variance and learning curve, and the ratios."""

import json

from conftest import run_python


def test_quick_benchmark_reports_every_algorithm(tmp_path):
    proc = run_python(["tools/bench_algorithms.py", "--quick", "--out", str(tmp_path)], timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["timing"]) == {"remax", "ppo", "reinforce", "remax_n4", "rloo_n2",
                                      "grpo_n2"}
    ppo, remax = results["timing"]["ppo"]["states"], results["timing"]["remax"]["states"]
    # both hold a reference and the reward model; PPO's critic is trained (Adam: 2 moments)
    assert set(ppo) == {"policy", "critic", "reference", "reward_model"}
    assert set(remax) == {"policy", "reference", "reward_model"}
    assert ppo["critic"]["optimizer"] == 2 * ppo["critic"]["params"]
    assert remax["policy"] == ppo["policy"]
    for when in results["variance"].values():
        assert set(when) == {"reinforce", "remax", "remax_n4", "rloo_n4", "grpo_n4"}
        assert all(x["variance"] > 0 for x in when.values())
    assert all(len(rows) == 3 for rows in results["curves"].values())
    assert (tmp_path / "algorithms.png").stat().st_size > 10000
    assert "ReMax step time / PPO's:" in proc.stdout
    assert "ReMax gradient variance / REINFORCE's (init):" in proc.stdout
