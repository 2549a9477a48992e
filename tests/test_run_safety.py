"""Runs never lose data: a used output directory is refused unless told --resume or --overwrite,
a second run into a directory in use stops at once naming the holder (the first is unharmed),
--resume with nothing to resume is an error (--resume auto starts), --overwrite removes only
the previous run's files, and the lock dies with its process (kill -9)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_metrics, run_python, worker_env
from remax_megatron.config_io import ConfigError
from remax_megatron.training.run_dir import LOCK_FILE, MANIFEST, RunDirectory, newest_checkpoint

TINY = ["train.steps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
        "rollout.max_new_tokens=4", "log.tensorboard=false", "log.plot=false"]


def train(run: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_python(["-m", "remax_megatron", "train", "--output-dir", str(run), *TINY, *extra],
                      check=check)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The process failed with exit 2, and the error is one line, the last, with no traceback
    (INFO progress lines may come before it)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("remax-megatron train: error: "), proc.stderr
    assert all(" INFO " in line for line in lines[:-1]), proc.stderr
    return lines[-1]


def assert_unlocked(lock: Path) -> None:
    import fcntl

    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises when someone holds it


def fingerprint(run: Path) -> dict:
    """Every file of a run directory with the hash of its bytes (the lock file aside)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run, as a template to copy."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(run)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_a_used_directory_is_refused_and_left_untouched(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = fingerprint(run)
    line = one_error_line(train(run, "train.steps=3", check=False))
    assert "holds another run" in line and "--resume" in line and "--overwrite" in line
    assert fingerprint(run) == before


def test_overwrite_removes_only_the_previous_runs_files(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "my_notes.txt").write_text("keep me")
    (run / "checkpoints" / "step_000002" / "marker").write_text("old run")
    line = one_error_line(train(run, "train.steps=1", "--overwrite", check=False))
    assert "holds files no remax-megatron run wrote (my_notes.txt)" in line
    train(run, "train.steps=1", "--overwrite", "--allow-other-files")
    assert (run / "my_notes.txt").read_text() == "keep me"
    assert [m["step"] for m in run_metrics(run)] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert_unlocked(run / LOCK_FILE)  # released at the end


def test_resume_needs_a_checkpoint_and_auto_starts_without_one(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(train(empty, "--resume", check=False))
    assert "nothing to resume" in line and "--resume auto" in line
    assert not (empty / "config.yaml").exists()
    train(empty, "--resume", "auto")  # nothing there: a new run
    assert [m["step"] for m in run_metrics(empty)] == [1, 2]
    # a requeued job: the finished run resumes (more steps), nothing redone
    train(empty, "--resume", "auto", "train.steps=3")
    assert [m["step"] for m in run_metrics(empty)] == [1, 2, 3]


def test_resume_with_another_optimizer_type_is_one_line(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = fingerprint(run)
    line = one_error_line(train(run, "--resume", "train.steps=3",
                                "train.use_distributed_optimizer=true", check=False))
    assert "was saved with train.use_distributed_optimizer=false: resume with the same" in line
    assert fingerprint(run) == before


def test_overwrite_never_removes_the_checkpoint_it_would_load(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = fingerprint(run)
    line = one_error_line(train(run, "--overwrite", f"policy.load={run}", "policy.model=null",
                                "policy.builtin_tokenizer=false", check=False))
    assert f"policy.load={run / 'checkpoints' / 'step_000002'} lies inside output_dir" in line
    assert fingerprint(run) == before


def test_resume_and_overwrite_together_is_an_error(tmp_path):
    line = one_error_line(train(tmp_path / "run", "--resume", "--overwrite", check=False))
    assert "give one of them" in line


_calls = 0


def held_vowel_share(prompts, responses):
    """The demo's reward, but from the second call on (the first is the probe) it waits until
    the file $RELEASE exists: the run stays alive while the test tries to start another."""
    global _calls
    _calls += 1
    release = Path(os.environ["RELEASE"])
    while _calls > 1 and not release.exists():
        time.sleep(0.05)
    return demo_share(prompts, responses)


def demo_share(prompts, responses):
    from remax_megatron.training.demo import vowel_share

    return vowel_share(prompts, responses)


def test_a_second_run_into_a_directory_in_use_stops_and_the_first_is_unharmed(tmp_path):
    run, release = tmp_path / "run", tmp_path / "release"
    env = {**worker_env(), "RELEASE": str(release)}
    first = subprocess.Popen(
        [sys.executable, "-m", "remax_megatron", "train", "--output-dir", str(run), *TINY,
         "train.steps=6", "checkpoint.save_every=2",
         "reward.rule=test_run_safety:held_vowel_share"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "config.yaml").is_file() and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()[-3000:]
        for extra in ([], ["--overwrite"], ["--resume", "auto"]):
            line = one_error_line(train(run, *extra, check=False))
            assert "is in use by another run" in line and f"pid {first.pid}" in line
    finally:
        release.write_text("")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert [m["step"] for m in run_metrics(run)] == list(range(1, 7))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"


def test_the_lock_dies_with_its_process(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "remax_megatron", "train", "--output-dir", str(run), *TINY,
         "train.steps=400", "checkpoint.save_every=1"],
        env=worker_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert_unlocked(run / LOCK_FILE)  # the kernel released it with the process
    done = int(latest.read_text().strip().split("_")[1])
    train(run, "--resume", "auto", f"train.steps={done + 1}")
    assert run_metrics(run)[-1]["step"] == done + 1


def test_run_directory_rules_in_process(tmp_path):
    """The decisions themselves, without a model: what is a run, what is removed."""
    d = tmp_path / "out"
    d.mkdir()
    (d / "unrelated.txt").write_text("x")
    first = RunDirectory(d, allow_other_files=True)
    assert first.prepare(lambda _: None).resume_from is None  # not a run: start
    first.close()
    holder = RunDirectory(d, allow_other_files=True)
    holder.prepare(lambda _: None)
    with pytest.raises(ConfigError, match=r"in use by another run \(pid \d+ on "):
        RunDirectory(d, allow_other_files=True).prepare(lambda _: None)
    holder.close()
    (d / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="holds another run \\(metrics.jsonl\\)"):
        RunDirectory(d, allow_other_files=True).prepare(lambda _: None)
    fake = d / "checkpoints" / "step_000003"
    resumer = RunDirectory(d, resume=True)
    assert resumer.prepare(lambda _: fake).resume_from == fake
    resumer.close()
    (d / "checkpoints").mkdir()
    overwriter = RunDirectory(d, overwrite=True, allow_other_files=True)
    assert overwriter.prepare(lambda _: None).resume_from is None
    assert sorted(p.name for p in d.iterdir()) == [MANIFEST, LOCK_FILE, "unrelated.txt"]
    overwriter.close()
    with pytest.raises(ConfigError, match="--resume: output_dir .*/missing does not exist"):
        RunDirectory(tmp_path / "missing", resume=True).prepare(lambda _: None)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ConfigError, match="is a file"):
        (tmp_path / "file").write_text("")
        RunDirectory(tmp_path / "file").prepare(lambda _: None)
    with pytest.raises(ConfigError, match="cannot be written"):
        RunDirectory(tmp_path / "file" / "below").prepare(lambda _: None)
    with pytest.raises(ConfigError, match="--resume 'sometimes'"):
        RunDirectory(d, resume="sometimes")


def prepare(path, **kw):
    run = RunDirectory(path, **kw)
    try:
        return run.prepare(newest_checkpoint)
    finally:
        run.close()


def fake_checkpoint(step_dir: Path, complete: bool = True) -> Path:
    """The files locate.is_complete looks for (trainer_state.json last, as a save writes it)."""
    (step_dir / "model").mkdir(parents=True)
    for name in ("remax_checkpoint.json", "model/metadata.json",
                 *(["trainer_state.json"] if complete else [])):
        (step_dir / name).write_text("{}")
    return step_dir


def test_only_what_a_run_of_ours_wrote_is_ever_removed(tmp_path, monkeypatch):
    """Files named like a run's (a hand-written config.yaml, another tool's checkpoints/, an hf/
    model) but not in a run's manifest are refused with every flag and left as they were;
    other files need --allow-other-files; the root and home directories are refused."""
    for name in ("config.yaml", "checkpoints/other_tool.bin", "hf/model.safetensors"):
        d = tmp_path / name.replace("/", "_")
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text("user's")
        for kw in ({}, {"overwrite": True}, {"resume": "auto"}, {"allow_other_files": True}):
            with pytest.raises(ConfigError, match=f"holds {name.split('/')[0]}.*which a run "
                               "writes, but no remax-megatron run wrote them there"):
                prepare(d, **kw)
            assert (d / name).read_text() == "user's" and not (d / MANIFEST).exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user's")
    with pytest.raises(ConfigError, match=r"holds files no remax-megatron run wrote \(notes.txt\)"
                       ": choose a new or empty output_dir, or pass --allow-other-files"):
        prepare(mine)
    prepare(mine, allow_other_files=True)
    assert "config.yaml" in json.loads((mine / MANIFEST).read_text())["files"]
    (mine / "config.yaml").write_text("the run's")  # a run's file: --overwrite removes it
    prepare(mine, overwrite=True, allow_other_files=True)
    assert sorted(p.name for p in mine.iterdir()) == [MANIFEST, LOCK_FILE, "notes.txt"]
    monkeypatch.setenv("HOME", str(mine))
    for special in (mine, Path("/")):
        with pytest.raises(ConfigError, match="is the (home|root) directory: a run writes"):
            prepare(special, overwrite=True, allow_other_files=True)


def test_resume_auto_never_starts_over_on_a_damaged_checkpoint(tmp_path):
    """--resume auto: a newest save without its trainer state resumes from the complete one
    before it; with no complete one left it stops and removes nothing."""
    run = tmp_path / "run"
    run.mkdir()
    prepare(run)  # the manifest of a run of ours
    (run / "metrics.jsonl").write_text("{}\n")
    good = fake_checkpoint(run / "checkpoints" / "step_000002")
    fake_checkpoint(run / "checkpoints" / "step_000004", complete=False)
    (run / "checkpoints" / "latest").write_text("step_000004\n")
    assert prepare(run, resume="auto").resume_from == good
    (good / "trainer_state.json").unlink()
    before = fingerprint(run)
    with pytest.raises(ConfigError, match=r"--resume auto: .*checkpoints holds latest, "
                       "step_000002, step_000004 but no complete checkpoint .* so it will not "
                       "start over"):
        prepare(run, resume="auto")
    assert fingerprint(run) == before
    # a run of an earlier version, without a manifest, resumes (its files become the run's)
    (good / "trainer_state.json").write_text("{}")
    (run / MANIFEST).unlink()
    assert prepare(run, resume="auto").resume_from == good
    assert (run / MANIFEST).is_file()


def test_lock_names_its_holder(tmp_path):
    holder = RunDirectory(tmp_path)
    holder.prepare(lambda _: None)
    info = json.loads((tmp_path / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid()
    holder.close()
    assert_unlocked(tmp_path / LOCK_FILE)


def test_a_run_whose_every_update_is_skipped_stops(tmp_path):
    """Rewards of +-3e38 (finite in float32) overflow the REINFORCE loss: every update is
    skipped, and after train.max_skipped_steps such steps the run stops with one line instead
    of running to the end and saving the untrained weights as trained."""
    rule = tmp_path / "huge.py"
    rule.write_text("def reward(prompts, responses):\n"
                    "    return [3.0e38 if len(r) % 2 else -3.0e38 for r in responses]\n")
    run = tmp_path / "run"
    proc = train(run, "train.steps=8", f"reward.rule={rule}:reward", "algorithm.name=reinforce",
                 "train.max_skipped_steps=3", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("remax-megatron train: error: steps 1-3: every update skipped")
    assert "train.max_skipped_steps=0" in line
    assert [(m["step"], m["skipped"]) for m in run_metrics(run)] == [(1, 1), (2, 1), (3, 1)]
    assert not (run / "checkpoints").exists()
