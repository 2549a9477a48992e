"""Whole training runs of the comparison algorithms on CPU: PPO (critic, reference, GAE) and GRPO
(groups of samples, several epochs and mini-batches) at tp2, pp2 and dp2 log the single-process
run's metrics; a PPO run killed after a checkpoint and resumed logs exactly the uninterrupted
run's metrics and ends with the same policy and critic; n-sample ReMax shares one greedy baseline."""

from __future__ import annotations

import pytest
import torch

from conftest import full_and_resumed_runs, run_metrics, run_python, run_torchrun, same_run
from remax_megatron.convert.commands import mcore_to_hf

SMALL = ["train.steps=3", "train.global_batch_size=8", "train.micro_batch_size=4",
         "rollout.max_new_tokens=8", "train.lr=1e-2", "policy.model.tie_word_embeddings=true"]
CONFIGS = {
    # one update per step: old log-probs and advantages from the training forward itself
    "ppo": ["algorithm.name=ppo", "critic.lr=5e-3"],
    # old log-probs fixed before 2 epochs x 2 mini-batches, advantages whitened over all dp ranks
    "ppo_minibatches": ["algorithm.name=ppo", "algorithm.ppo_epochs=2", "algorithm.mini_batches=2",
                        "algorithm.whiten_advantages=true", "train.micro_batch_size=2"],
    "grpo": ["algorithm.name=grpo", "rollout.n_samples=2", "algorithm.ppo_epochs=2",
             "algorithm.mini_batches=2"],
}
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"],
           "dp2": ["train.use_distributed_optimizer=true"]}
CASES = [("ppo", "tp2"), ("ppo", "pp2"), ("ppo_minibatches", "dp2"), ("grpo", "tp2"),
         ("grpo", "pp2"), ("grpo", "dp2")]


def train_args(run, *extra) -> list[str]:
    return ["-m", "remax_megatron", "train", "--output-dir", str(run), *SMALL, *extra]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """Each config once as a single process: the reference for every layout."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    for name, extra in CONFIGS.items():
        run_python(train_args(root / name, *extra))
        runs[name] = run_metrics(root / name)
    return runs


def test_single_process_runs_log_what_each_algorithm_does(single_runs):
    ppo, grpo = single_runs["ppo"], single_runs["grpo"]
    assert "reward/greedy" not in ppo[0] and "reward/greedy" not in grpo[0]
    for row in ppo:
        assert {"critic/value_loss", "critic/grad_norm", "clip_fraction", "time/critic"} <= set(row)
        assert row["logprob_mismatch"] < 1e-4
    # one update per step: the ratio is exactly 1, nothing is clipped
    assert all(row["clip_fraction"] == 0.0 for row in ppo)
    assert ppo[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    # PPO's first advantages come from zero values (the critic's head starts at 0)
    assert ppo[0]["critic/value_loss"] > 0
    assert "critic/value_loss" not in grpo[0]
    # 2 epochs x 2 mini-batches: the later updates move the policy off the rollout's
    assert any(row["clip_fraction"] > 0 for row in grpo + single_runs["ppo_minibatches"])


@pytest.mark.distributed
@pytest.mark.parametrize("config,layout", CASES, ids=[f"{c}_{l}" for c, l in CASES])
def test_parallel_runs_match_the_single_process_run(config, layout, single_runs, tmp_path):
    run = tmp_path / "run"
    run_torchrun(2, train_args(run, *CONFIGS[config], *LAYOUTS[layout]))
    same_run(single_runs[config], run_metrics(run))


def test_killed_and_resumed_ppo_run_is_exact_with_the_critic(tmp_path):
    full, broken = full_and_resumed_runs(
        [*SMALL, *CONFIGS["ppo"], "train.steps=4", "checkpoint.save_every=2"], tmp_path)
    same_run(run_metrics(full), run_metrics(broken), tol=0.0)
    from safetensors.torch import load_file

    for part in ("", "critic"):  # the critic exports as a sequence classifier
        step = "checkpoints/step_000004" + (f"/{part}" if part else "")
        a = mcore_to_hf(full / step, tmp_path / f"a{part}")
        b = mcore_to_hf(broken / step, tmp_path / f"b{part}")
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        if part:
            assert "score.weight" in wa


def test_remax_with_four_samples_shares_one_greedy_baseline(tmp_path):
    run = tmp_path / "run"
    run_python(train_args(run, "rollout.n_samples=4", "train.steps=1"))
    (row,) = run_metrics(run)
    assert {"reward/greedy", "response_length/greedy"} <= set(row)
    assert row["logprob_mismatch"] < 1e-4
