"""End-to-end training on CPU: the built-in demo as a single process, the same run at tp2, pp2
and dp2 with the distributed optimizer (identical rollouts and rewards, losses within float
noise), KL to a reference, a killed-and-resumed run that logs exactly the uninterrupted run's
metrics, a non-finite step that is skipped, and export of a training checkpoint to transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from conftest import full_and_resumed_runs, run_metrics, run_python, run_torchrun, same_run
from remax_megatron.convert.commands import mcore_to_hf
from remax_megatron.runtime import precision

# tied embeddings: at pp2 the last stage keeps its own copy, which must start and stay equal
SMALL = ["train.steps=3", "train.global_batch_size=8", "train.micro_batch_size=4",
         "rollout.max_new_tokens=8", "train.lr=1e-2", "policy.model.tie_word_embeddings=true"]
KEYS = ("step", "reward/sampled", "reward/greedy", "advantage/mean", "advantage/std", "loss",
        "entropy", "grad_norm", "kl", "lr", "response_length/sampled", "response_length/greedy",
        "epoch", "skipped", "time/rollout", "time/reward", "time/train", "time/step",
        "tokens_per_second", "memory/peak_gib")


def metrics(run: Path) -> list[dict]:
    return run_metrics(run)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    proc = run_python(["-m", "remax_megatron", "train", "--output-dir", str(run), *SMALL])
    return run, proc


def test_demo_single_process_writes_everything(single):
    run, proc = single
    rows = metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3]
    for m in rows:
        assert set(KEYS) <= set(m)
        assert all(isinstance(m[k], (int, float)) for k in KEYS)
        # the KV-cached rollout and the training forward agree on every sampled token
        assert m["logprob_mismatch"] < 1e-4
    assert "reward of sampled responses:" in proc.stderr
    assert (run / "reward_curves.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_training_checkpoint_exports_to_transformers(single, tmp_path):
    run, _ = single
    out = mcore_to_hf(run / "checkpoints" / "step_000003", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("tell me about the lazy dog", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2"],
                                    ["train.use_distributed_optimizer=true"]],
                         ids=["tp2", "pp2", "dp2_distributed_optimizer"])
def test_parallel_runs_match_the_single_process_run(layout, single, tmp_path):
    run = tmp_path / "run"
    run_torchrun(2, ["-m", "remax_megatron", "train", "--output-dir", str(run), *SMALL, *layout])
    same_run(metrics(single[0]), metrics(run))


@pytest.mark.distributed
def test_kl_to_a_reference_and_token_mean(tmp_path):
    run = tmp_path / "run"
    run_torchrun(2, ["-m", "remax_megatron", "train", "--output-dir", str(run), *SMALL,
                     "parallel.pp=2", "algorithm.kl_coef=0.05", "algorithm.gamma=0.95",
                     "algorithm.loss_reduction=token_mean", "algorithm.clip_advantage=5.0",
                     "checkpoint.export_hf=true"])
    # export_hf under torchrun: a single-process export of the final checkpoint
    exported = transformers.AutoModelForCausalLM.from_pretrained(run / "hf")
    assert exported.config.num_hidden_layers == 2
    rows = metrics(run)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert any(abs(m["kl"]) > 1e-6 for m in rows[1:])  # they part after an update


def test_killed_and_resumed_run_logs_the_same_metrics(tmp_path):
    full, broken = full_and_resumed_runs([*SMALL, "train.steps=4", "checkpoint.save_every=2"],
                                         tmp_path)
    same_run(metrics(full), metrics(broken), tol=0.0)
    a = mcore_to_hf(full / "checkpoints" / "step_000004", tmp_path / "a")
    b = mcore_to_hf(broken / "checkpoints" / "step_000004", tmp_path / "b")
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def huge_rewards(prompts, responses):
    """Finite rewards whose greedy/sampled difference overflows: a non-finite loss."""
    return [3e38 if len(r) % 2 else -3e38 for r in responses]


def test_non_finite_step_is_skipped_and_leaves_weights(tmp_path):
    run = tmp_path / "run"
    run_python(["-m", "remax_megatron", "train", "--output-dir", str(run), *SMALL,
                "train.steps=1", "reward.rule=test_train_e2e:huge_rewards"])
    (row,) = metrics(run)
    assert row["skipped"] == 1
    # the run was seeded like the single-process demo: its initial weights are the ones saved
    init = tmp_path / "init"
    run_python(["-m", "remax_megatron", "train", "--output-dir", str(init), *SMALL,
                "train.steps=1", "train.lr=0.0"])
    a = mcore_to_hf(run / "checkpoints" / "step_000001", tmp_path / "a")
    b = mcore_to_hf(init / "checkpoints" / "step_000001", tmp_path / "b")
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def cosine_lr(step: int, total: int, lr: float = 1e-2) -> float:
    """The LR step ``step`` (1-based) trains with: cosine from lr to 0 over ``total`` steps, no
    warmup (megatron's schedule; the scheduler moves on after each step)."""
    return 0.5 * lr * (1 + math.cos(math.pi * (step - 1) / total))


def test_resumed_with_more_steps_and_another_lr_follows_the_new_schedule(tmp_path):
    full, broken = full_and_resumed_runs([*SMALL, "train.steps=4", "checkpoint.save_every=2"],
                                         tmp_path, resume_args=("train.steps=8", "train.lr=2e-2"))
    # the logged LR is the one each step trained with (step 1: the full LR, no warmup)
    assert [m["lr"] for m in metrics(full)] == pytest.approx(
        [cosine_lr(t, 4) for t in (1, 2, 3, 4)], rel=1e-12)
    resumed = metrics(broken)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    # steps 1-2 ran under the 4-step schedule; after the resume the 8-step one with the new peak
    # LR continues at step 3 (the checkpoint's param groups must not bring the old LR back)
    want = [cosine_lr(t, 4) for t in (1, 2)] + [cosine_lr(t, 8, lr=2e-2) for t in range(3, 9)]
    assert [m["lr"] for m in resumed] == pytest.approx(want, rel=1e-12)
    same_run(metrics(full)[:2], resumed[:2], tol=0.0)


@pytest.mark.distributed
def test_killed_and_resumed_distributed_optimizer_run_is_exact(tmp_path):
    # megatron's distributed optimizer cannot load its state before its first step with torch's
    # Adam, nor copy into its fp32 main parameters with autograd on: both handled on load
    full, broken = full_and_resumed_runs(
        [*SMALL, "train.steps=4", "checkpoint.save_every=2", "train.use_distributed_optimizer=true"],
        tmp_path, nproc=2)
    same_run(metrics(full), metrics(broken), tol=0.0)
    a = mcore_to_hf(full / "checkpoints" / "step_000004", tmp_path / "a")
    b = mcore_to_hf(broken / "checkpoints" / "step_000004", tmp_path / "b")
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


BF16 = pytest.mark.skipif(not precision.bf16_supported(), reason="no native bf16 on this machine")


@BF16
def test_bf16_demo_raises_the_reward(tmp_path):
    """The built-in demo in bf16 (Float16Module, fp32 main parameters in the optimizer): the
    GPU's precision path, here on the CPU's bf16 kernels, learns as the fp32 run does."""
    run = tmp_path / "run"
    run_python(["-m", "remax_megatron", "train", "--output-dir", str(run), "train.dtype=bf16",
                "log.tensorboard=false", "log.plot=false"])
    rows = metrics(run)
    assert len(rows) == 60 and all(m["skipped"] == 0 for m in rows)
    first = sum(m["reward/sampled"] for m in rows[:5]) / 5
    last = sum(m["reward/sampled"] for m in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    assert rows[-1]["reward/greedy"] > rows[0]["reward/greedy"] + 0.3
    # rollout (bf16 KV-cached) and training (bf16 full-sequence) log-probs of the same tokens
    assert max(m["logprob_mismatch"] for m in rows) < 0.05
    saved = json.loads((run / "checkpoints" / "step_000060" / "remax_checkpoint.json").read_text())
    assert saved["dtype"] == "bf16"


@BF16
def test_killed_and_resumed_bf16_run_is_exact(tmp_path):
    """The fp32 main parameters and Adam's moments come back with the bf16 weights."""
    full, broken = full_and_resumed_runs(
        [*SMALL, "train.steps=4", "checkpoint.save_every=2", "train.dtype=bf16"], tmp_path)
    same_run(metrics(full), metrics(broken), tol=0.0)
    a = mcore_to_hf(full / "checkpoints" / "step_000004", tmp_path / "a")
    b = mcore_to_hf(broken / "checkpoints" / "step_000004", tmp_path / "b")
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
