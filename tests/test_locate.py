"""resolve_checkpoint: a checkpoint, a run directory, its checkpoints/ or checkpoints/latest ->
the checkpoint directory to load (the newest complete one), one-line errors naming the flag."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from remax_megatron.config_io import ConfigError
from remax_megatron.models import locate
from remax_megatron.models.locate import resolve_checkpoint


def make_checkpoint(directory: Path) -> Path:
    """The files read_checkpoint looks for (a converted checkpoint: no trainer state)."""
    (directory / "model").mkdir(parents=True)
    (directory / "model" / "metadata.json").write_text("{}")
    (directory / "remax_checkpoint.json").write_text(json.dumps({"kind": "policy"}))
    return directory


def make_step(run: Path, step: int, complete: bool = True, name: str | None = None) -> Path:
    """A training checkpoint under RUN/checkpoints/; incomplete: no trainer_state.json."""
    path = make_checkpoint(run / "checkpoints" / (name or f"step_{step:06d}"))
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def point_latest(run: Path, name: str) -> Path:
    latest = run / "checkpoints" / "latest"
    latest.write_text(name + "\n")
    return latest


@pytest.fixture
def run(tmp_path) -> Path:
    """A run that saved steps 2 and 4 (latest -> step 4)."""
    run = tmp_path / "run"
    (run / "metrics.jsonl").parent.mkdir()
    (run / "metrics.jsonl").write_text("")
    make_step(run, 2)
    make_step(run, 4)
    point_latest(run, "step_000004")
    return run


def resolve_logged(path, caplog, flag="--load") -> tuple[Path, str]:
    with caplog.at_level(logging.INFO, logger="remax_megatron.models.locate"):
        chosen = resolve_checkpoint(path, flag)
    return chosen, "\n".join(r.getMessage() for r in caplog.records)


def expect_error(path, needle: str, flag: str = "--load") -> str:
    with pytest.raises(ConfigError) as err:
        resolve_checkpoint(path, flag)
    message = str(err.value)
    assert needle in message, message
    assert message.startswith(f"{flag} {path}"), message
    assert "\n" not in message
    return message


def test_a_checkpoint_directory_is_used_as_it_is(tmp_path, caplog):
    ckpt = make_checkpoint(tmp_path / "converted")
    chosen, logged = resolve_logged(ckpt, caplog)
    assert chosen == ckpt
    assert logged == "", "nothing was resolved, so nothing to say"


def test_a_step_and_its_critic_are_checkpoints_themselves(run):
    step = run / "checkpoints" / "step_000002"
    critic = make_checkpoint(step / "critic")
    assert resolve_checkpoint(step, "--load") == step
    assert resolve_checkpoint(critic, "--load") == critic


@pytest.mark.parametrize("named", ["run", "checkpoints", "latest"])
def test_run_checkpoints_and_latest_give_the_latest(run, caplog, named):
    path = {"run": run, "checkpoints": run / "checkpoints",
            "latest": run / "checkpoints" / "latest"}[named]
    chosen, logged = resolve_logged(path, caplog)
    assert chosen == run / "checkpoints" / "step_000004"
    assert logged == f"--load {path}: using {chosen} (named by latest)"


def test_latest_wins_over_a_higher_complete_step(run):
    make_step(run, 6)  # e.g. a crash between the rename and the update of latest
    assert resolve_checkpoint(run, "--load").name == "step_000004"


def test_latest_naming_an_incomplete_step_falls_back(run, caplog):
    make_step(run, 6, complete=False)
    point_latest(run, "step_000006")
    chosen, logged = resolve_logged(run, caplog)
    assert chosen == run / "checkpoints" / "step_000004"
    assert "latest names 'step_000006', not a complete checkpoint" in logged


@pytest.mark.parametrize("pointer", [b"\xff\xfe garbage", b"../../etc\n", b"", b"step_000004/..\n"])
def test_a_damaged_latest_falls_back_to_the_newest_complete_step(run, pointer):
    (run / "checkpoints" / "latest").write_bytes(pointer)
    assert resolve_checkpoint(run, "--load").name == "step_000004"


def test_latest_naming_a_deleted_step_falls_back(run):
    point_latest(run, "step_000008")
    assert resolve_checkpoint(run, "--load").name == "step_000004"


def test_without_latest_the_highest_step_number_wins(tmp_path, caplog):
    run = tmp_path / "run"
    make_step(run, 999_999)
    make_step(run, 1_000_000)  # sorts first as text
    chosen, logged = resolve_logged(run, caplog)
    assert chosen.name == "step_1000000"
    assert "the newest complete checkpoint; latest is missing" in logged


@pytest.mark.parametrize("missing", ["trainer_state.json", "remax_checkpoint.json",
                                     "model/metadata.json"])
def test_a_step_missing_any_file_is_incomplete(run, missing):
    newest = make_step(run, 6)
    point_latest(run, "step_000006")
    assert resolve_checkpoint(run, "--load") == newest
    (newest / missing).unlink()
    assert resolve_checkpoint(run, "--load").name == "step_000004"


def test_a_tmp_save_in_progress_is_ignored(run):
    (run / "checkpoints" / "latest").unlink()
    make_step(run, 8, name=".step_000008.tmp")  # even with every file in it
    assert resolve_checkpoint(run, "--load").name == "step_000004"
    expect_error(run / "checkpoints" / ".step_000008.tmp", "still being saved")


def test_a_run_without_a_complete_checkpoint_is_an_error(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    expect_error(run, "holds no complete checkpoint", flag="policy.load")
    make_step(run, 2, complete=False)
    make_step(run, 4, name=".step_000004.tmp")
    point_latest(run, "step_000002")
    expect_error(run, "holds no complete checkpoint")
    expect_error(run / "checkpoints", "holds no complete checkpoint")
    expect_error(run / "checkpoints" / "latest", "holds no complete checkpoint")


def test_a_run_that_has_not_saved_yet(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    expect_error(run, "is a training run directory without checkpoints/")


@pytest.mark.parametrize("flag", ["--load", "policy.load"])
def test_a_path_that_does_not_exist(tmp_path, flag):
    expect_error(tmp_path / "nowhere", "does not exist", flag=flag)


def test_an_empty_directory(tmp_path):
    expect_error(tmp_path, "is not a remax-megatron checkpoint (no remax_checkpoint.json) nor a "
                           "training run directory")


def test_a_hugging_face_directory_gets_the_convert_hint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    expect_error(tmp_path, f"run remax-megatron convert hf-to-mcore --hf {tmp_path} --out DIR "
                           "first")


def test_a_file_other_than_latest(run):
    expect_error(run / "metrics.jsonl", "is a file")


def test_file_names_agree_with_the_writers():
    from remax_megatron.models import checkpoint
    from remax_megatron.training import checkpointing

    assert locate.META_FILE == checkpoint.META_FILE
    assert locate.WEIGHTS_METADATA == f"{checkpoint.WEIGHTS_DIR}/metadata.json"
    assert locate.STATE_FILE == checkpointing.STATE_FILE
    assert locate.LATEST == checkpointing.LATEST
