"""Training checkpoints that are damaged, planted or cannot be written.

* Loading unpickles nothing of ours (RNG states are safetensors + JSON), and the pickles of
  megatron's format (.metadata, common.pt, the distributed optimizer's object entries) are
  read first with an allowlist: a planted pickle is refused, and its code never runs.
* A damaged checkpoint (missing or truncated shards, bad metadata, a different model) is one
  line that names the file or the key and says what to do; the checkpoint is left as it was.
* A save that cannot write (full disk, read-only directory; simulated by
  workers/checkpoint_faults.py: we run as root) is one line naming the file and the last good
  checkpoint, which is intact; the partial directory is removed; every rank ends.
* Pruning keeps the newest complete step_N by number, never the one just saved or named by
  latest, never a higher step, and never a directory that is not step_<digits>.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, WORKERS, run_metrics, run_python, run_torchrun
from remax_megatron.config_io import ConfigError
from remax_megatron.training import rng_state
from remax_megatron.training.checkpoint_checks import check_training_checkpoint
from remax_megatron.training.checkpointing import _prune

FAULTS = WORKERS / "checkpoint_faults.py"
SMALL = ["train.global_batch_size=8", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
         "checkpoint.save_every=1", "checkpoint.keep_last=0"]
# the distributed optimizer: its checkpoint holds object entries that torch unpickles
BASE = [*SMALL, "train.use_distributed_optimizer=true"]


class Plant:
    """A pickle that runs a command when unpickled: it must never be."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def planted(marker: Path) -> bytes:
    return pickle.dumps(Plant(marker))


def planted_torch(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state": Plant(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A run with complete checkpoints step_000001 and step_000002 (latest)."""
    run = tmp_path_factory.mktemp("base") / "run"
    run_python(["-m", "remax_megatron", "train", "--output-dir", str(run), *BASE,
                "train.steps=2"])
    return run


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def resume(run: Path, *extra: str, check: bool = False):
    return run_python(["-m", "remax_megatron", "train", "--output-dir", str(run), "--resume",
                       *BASE, "train.steps=3", *extra], check=check)


def one_error(proc, verb: str = "train") -> str:
    """The run failed with exactly one error line of ours and no traceback; returns it."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if f"{verb}: error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# --- A: nothing is unpickled that could run code -------------------------------------------
def test_rng_state_is_safetensors_and_restores_exactly(megatron_runtime, tmp_path):
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    def draw():
        with tensor_parallel.get_cuda_rng_tracker().fork():
            tracked = torch.rand(3)
        return (random.random(), float(np.random.rand()), torch.rand(3), tracked,
                random.gauss(0, 1))

    (tmp_path / rng_state.RNG_DIR).mkdir()
    path = rng_state.rng_file(tmp_path, 0)
    random.gauss(0, 1)  # a cached gaussian is part of Python's state
    rng_state.write_rng(path)
    first = draw()
    rng_state._set_rng(path)
    second = draw()
    assert first[:2] == second[:2] and first[4] == second[4]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_old_pickled_rng_file_is_not_loaded_and_the_run_resumes(base, tmp_path):
    run = copy_run(base, tmp_path)
    marker = tmp_path / "ran"
    (run / "checkpoints" / "step_000002" / "checksums.json").unlink()  # old releases wrote none
    rng = run / "checkpoints" / "step_000002" / "rng"
    (rng / "rank_00000.safetensors").unlink()
    (rng / "rank_00000.pt").write_bytes(planted(marker))  # what an old release wrote
    proc = resume(run, check=True)
    assert not marker.exists()
    warnings = [line for line in proc.stderr.splitlines() if "old pickled RNG format" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert [m["step"] for m in run_metrics(run)][-1] == 3


def _plant_object_entry(weights: Path, key_part: str, payload: bytes, as_tensor_key=False):
    """Point one entry of torch's .metadata at ``payload`` appended to a shard file. With
    ``as_tensor_key`` a tensor's entry is turned into an object entry (which torch would
    unpickle with weights_only=False)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    metadata = pickle.loads((weights / ".metadata").read_bytes())  # our own file: trusted here
    kind = TensorStorageMetadata if as_tensor_key else BytesStorageMetadata
    key = next(k for k, v in metadata.state_dict_metadata.items()
               if key_part in k and isinstance(v, kind))
    index = next(i for i in metadata.storage_data if i.fqn == key)
    info = metadata.storage_data[index]
    shard = weights / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    info.offset, info.length = offset, len(payload)
    if as_tensor_key:
        metadata.state_dict_metadata[key] = BytesStorageMetadata()
        for i in [i for i in metadata.storage_data if i.fqn == key and i is not index]:
            del metadata.storage_data[i]
        metadata.storage_data[type(index)(fqn=key)] = metadata.storage_data.pop(index)
    (weights / ".metadata").write_bytes(pickle.dumps(metadata))
    return key


PLANTS = {
    "rng safetensors": lambda ckpt, m: (ckpt / "rng" / "rank_00000.safetensors").write_bytes(
        planted(m)),
    "model .metadata": lambda ckpt, m: (ckpt / "model" / ".metadata").write_bytes(planted(m)),
    "optimizer .metadata": lambda ckpt, m: (ckpt / "optimizer" / ".metadata").write_bytes(
        planted(m)),
    "model common.pt": lambda ckpt, m: (ckpt / "model" / "common.pt").write_bytes(
        planted_torch(m)),
    "optimizer common.pt": lambda ckpt, m: (ckpt / "optimizer" / "common.pt").write_bytes(
        planted_torch(m)),
    "optimizer object entry": lambda ckpt, m: _plant_object_entry(
        ckpt / "optimizer", ".optimizer/shard", planted_torch(m)),
    "tensor entry made an object": lambda ckpt, m: _plant_object_entry(
        ckpt / "model", "word_embeddings.weight", planted_torch(m), as_tensor_key=True),
}
PLANT_MESSAGES = {"rng safetensors": "rank_00000.safetensors cannot be read",
                  "tensor entry made an object": "as a pickled object, not a tensor"}


@pytest.mark.parametrize("where", list(PLANTS))
def test_planted_pickle_is_refused_and_never_runs(base, tmp_path, where, monkeypatch):
    # the checksums would name the changed file first: this is the layer behind them (checksums
    # skipped, or rewritten by whoever planted the file)
    monkeypatch.setenv("REMAX_SKIP_CHECKSUMS", "1")
    run = copy_run(base, tmp_path)
    marker = tmp_path / "ran"
    PLANTS[where](run / "checkpoints" / "step_000002", marker)
    before = snapshot(run / "checkpoints")
    line = one_error(resume(run))
    assert not marker.exists()
    assert PLANT_MESSAGES.get(where, "not loaded") in line
    assert "step_000002" in line
    assert snapshot(run / "checkpoints") == before


# --- B: damaged checkpoints and other models -----------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _drop_line(path: Path, prefix: str) -> None:
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith(prefix)))


DAMAGE = {
    # name: (damage(checkpoint dir), the file or words the error names)
    "truncated model shard": (lambda c: _truncate(c / "model/__0_0.distcp"),
                              "model/__0_0.distcp is truncated"),
    "missing model shard": (lambda c: _remove(c / "model/__0_1.distcp"),
                            "model/__0_1.distcp is missing"),
    "truncated optimizer shard": (lambda c: _truncate(c / "optimizer/__0_1.distcp"),
                                  "optimizer/__0_1.distcp is truncated"),
    "missing optimizer": (lambda c: _remove(c / "optimizer"), "optimizer is missing"),
    "missing model/metadata.json": (lambda c: _remove(c / "model/metadata.json"),
                                    "model holds no finished dist_checkpointing weights"),
    "corrupt model/metadata.json": (lambda c: (c / "model/metadata.json").write_text("{x"),
                                    "model/metadata.json cannot be read as JSON"),
    "missing model/.metadata": (lambda c: _remove(c / "model/.metadata"),
                                "model/.metadata is missing"),
    "truncated model/.metadata": (lambda c: _truncate(c / "model/.metadata"),
                                  "model/.metadata cannot be read"),
    "truncated optimizer/common.pt": (lambda c: _truncate(c / "optimizer/common.pt"),
                                      "optimizer/common.pt cannot be read"),
    "missing model/common.pt": (lambda c: _remove(c / "model/common.pt"),
                                "model/common.pt is missing"),
    "missing remax_checkpoint.json": (lambda c: _remove(c / "remax_checkpoint.json"),
                                      "no remax_checkpoint.json"),
    "corrupt remax_checkpoint.json": (lambda c: (c / "remax_checkpoint.json").write_text("[1"),
                                      "remax_checkpoint.json cannot be read as JSON"),
    "remax_checkpoint.json without kind": (
        lambda c: _drop_line(c / "remax_checkpoint.json", '  "kind"'),
        "remax_checkpoint.json lacks kind"),
    "missing model_config.yaml": (lambda c: _remove(c / "model_config.yaml"),
                                  "model_config.yaml is missing"),
    "corrupt model_config.yaml": (lambda c: (c / "model_config.yaml").write_text("a: [1\nb: }"),
                                  "model_config.yaml is not valid YAML"),
    "model_config.yaml without hidden_size": (
        lambda c: _drop_line(c / "model_config.yaml", "hidden_size"),
        "model_config.yaml lacks hidden_size"),
    "corrupt trainer_state.json": (lambda c: (c / "trainer_state.json").write_text('{"st'),
                                   "trainer_state.json cannot be read"),
    "trainer_state.json without step": (
        lambda c: (c / "trainer_state.json").write_text('{"loader": [0, 8], "scheduler": {}}'),
        "trainer_state.json lacks 'step'"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_before_any_model_is_built(base, tmp_path, name):
    run = copy_run(base, tmp_path)
    ckpt = run / "checkpoints" / "step_000002"
    damage, needle = DAMAGE[name]
    damage(ckpt)
    before = snapshot(ckpt)
    with pytest.raises(ConfigError) as caught:
        check_training_checkpoint(ckpt)  # what a resume runs first (no model needed)
    message = str(caught.value)
    assert "\n" not in message and needle in message, message
    assert str(ckpt) in message
    # what to do: another copy, or the earlier checkpoint, named
    assert "step_000001" in message or "fix the syntax" in message, message
    assert snapshot(ckpt) == before


def test_damaged_latest_checkpoint_on_resume_names_the_earlier_one(base, tmp_path):
    run = copy_run(base, tmp_path)
    _truncate(run / "checkpoints" / "step_000002" / "model" / "__0_0.distcp")
    before = snapshot(run / "checkpoints")
    line = one_error(resume(run))
    assert "step_000002/model/__0_0.distcp is truncated" in line
    assert f"write that name into {run / 'checkpoints' / 'latest'}" in line
    assert snapshot(run / "checkpoints") == before
    # following the advice resumes
    (run / "checkpoints" / "latest").write_text("step_000001\n")
    resume(run, check=True)
    assert [m["step"] for m in run_metrics(run)][-2:] == [2, 3]


def flip_embedding_byte(weights: Path) -> Path:
    """Change one byte inside the word embedding's data (the file stays well-formed)."""
    metadata = pickle.loads((weights / ".metadata").read_bytes())
    info = next(v for k, v in metadata.storage_data.items()
                if k.fqn == "embedding.word_embeddings.weight")
    shard = weights / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset + 100] ^= 0x40  # one bit of one weight
    shard.write_bytes(bytes(data))
    return shard


def test_a_flipped_byte_is_caught_by_the_checksums(base, tmp_path, monkeypatch):
    """One changed byte inside a tensor loads silently without checksums; with them a resume
    stops with one line naming the file; REMAX_SKIP_CHECKSUMS=1 loads it unchecked."""
    run = copy_run(base, tmp_path)
    shard = flip_embedding_byte(run / "checkpoints" / "step_000002" / "model")
    line = one_error(resume(run))
    assert f"{shard} is corrupted (crc32 " in line and "REMAX_SKIP_CHECKSUMS=1" in line
    monkeypatch.setenv("REMAX_SKIP_CHECKSUMS", "1")
    resume(run, check=True)
    assert [m["step"] for m in run_metrics(run)][-1] == 3


def test_corrupt_optimizer_and_rng_bytes_are_named_on_resume(base, tmp_path):
    run = copy_run(base, tmp_path)
    step = run / "checkpoints" / "step_000002"
    for victim in (next((step / "optimizer").glob("*.distcp")),
                   step / "rng" / "rank_00000.safetensors"):
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    line = one_error(resume(run))
    assert "is corrupted" in line and ("optimizer/" in line or "rng/" in line)


@pytest.mark.parametrize("override,needle", [
    ("policy.model.hidden_size=96", "has hidden_size=64 but this run's policy has hidden_size=96"),
    ("policy.model.vocab_size=400", "has vocab_size=320 but this run's policy has vocab_size=400"),
])
def test_resume_into_another_model_is_one_line(base, tmp_path, override, needle):
    run = copy_run(base, tmp_path)
    before = snapshot(run / "checkpoints")
    line = one_error(resume(run, override))
    assert "step_000002/model_config.yaml" in line and needle in line
    assert "resume with the model settings the checkpoint was saved with" in line
    assert snapshot(run / "checkpoints") == before


def test_weights_of_another_shape_name_the_key_and_both_shapes(base, megatron_runtime):
    import dataclasses

    from remax_megatron.models.builder import build_model
    from remax_megatron.models.checkpoint import load_weights, read_checkpoint

    ckpt = read_checkpoint(base / "checkpoints" / "step_000002")
    wider = dataclasses.replace(ckpt.config, hidden_size=96, ffn_hidden_size=256)
    model = build_model(wider, perform_initialization=False)
    with pytest.raises(ConfigError) as caught:
        load_weights(model, ckpt.path / "model")
    message = str(caught.value)
    assert "\n" not in message
    assert "is [2, 64] in the checkpoint but [2, 96] in this model" in message, message


def test_load_model_checks_files_before_building(base, tmp_path, megatron_runtime, monkeypatch):
    from remax_megatron.models import checkpoint

    ckpt = copy_run(base, tmp_path) / "checkpoints" / "step_000002"
    _truncate(ckpt / "model" / "__0_1.distcp")
    monkeypatch.setattr(checkpoint, "build_chunks", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ConfigError, match=r"model/__0_1.distcp is truncated \(\d+ bytes, \d+ "
                                          r"expected\): the checkpoint is damaged"):
        checkpoint.load_model(ckpt)


@pytest.mark.distributed
def test_damaged_checkpoint_on_two_ranks_is_one_line(base, tmp_path):
    run = copy_run(base, tmp_path)
    _truncate(run / "checkpoints" / "step_000002" / "optimizer" / "__0_0.distcp")
    proc = run_torchrun(2, ["-m", "remax_megatron", "train", "--output-dir", str(run),
                            "--resume", *BASE, "train.steps=3", "parallel.tp=2"],
                        check=False, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if "train: error:" in line]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-4000:]
    assert "optimizer/__0_0.distcp is truncated" in errors[0]
    assert f'File "{ROOT / "remax_megatron"}' not in proc.stderr


# --- C: saves that cannot write --------------------------------------------------------------
def faulty_train(run: Path, code: str, glob: str, *extra: str, nproc: int = 1):
    args = [str(FAULTS), code, glob, "--", "train", "--output-dir", str(run), *SMALL,
            "train.steps=2", *extra]
    if nproc == 1:
        return run_python(args, check=False, timeout=180)
    return run_torchrun(nproc, args, check=False, timeout=180)


def assert_step_1_kept(run: Path, line: str) -> None:
    root = run / "checkpoints"
    assert f"the last good checkpoint {root / 'step_000001'} is intact" in line, line
    assert ".step_000002.tmp was removed" in line, line
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert (root / "latest").read_text().strip() == "step_000001"
    check_training_checkpoint(root / "step_000001")


SAVE_FAULTS = {
    # what fails: (errno[:calls that still succeed], glob)
    "model shard (megatron's writer process)": ("ENOSPC", "*/.step_000002.tmp/model/__0_0.distcp"),
    "common.pt (rank 0 alone, inside megatron)": ("ENOSPC", "*/.step_000002.tmp/model/common.pt"),
    "optimizer .metadata (megatron's finish)": ("ENOSPC", "*/.step_000002.tmp/optimizer/.metadata"),
    "rng state": ("ENOSPC", "*/.step_000002.tmp/rng/*"),
    "trainer_state.json": ("ENOSPC", "*/.step_000002.tmp/*trainer_state.json*"),
    "read-only checkpoints/": ("EACCES", "*/checkpoints/.step_000002.tmp"),
    "latest, after the rename": ("ENOSPC:1", "*/checkpoints/.latest.*"),
}


@pytest.mark.parametrize("what", list(SAVE_FAULTS))
def test_failed_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, what):
    code, glob = SAVE_FAULTS[what]
    run = tmp_path / "run"
    line = one_error(faulty_train(run, code, glob))
    reason = "Permission denied" if code == "EACCES" else "No space left on device"
    assert "checkpoint step_000002 not saved: could not write " in line
    assert reason in line
    assert_step_1_kept(run, line)


def test_after_a_failed_save_resume_continues(tmp_path):
    run = tmp_path / "run"
    one_error(faulty_train(run, "ENOSPC", "*/.step_000002.tmp/model/__0_0.distcp"))
    run_python(["-m", "remax_megatron", "train", "--output-dir", str(run), "--resume", *SMALL,
                "train.steps=2"])
    assert [m["step"] for m in run_metrics(run)][-1] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"


@pytest.mark.distributed
@pytest.mark.parametrize("what,glob", [
    ("rank 1's model shard", "*/.step_000002.tmp/model/__1_*.distcp"),
    ("rank 0's common.pt while rank 1 waits inside megatron", "*/.step_000002.tmp/model/common.pt"),
    ("rank 1's rng state", "*/.step_000002.tmp/rng/rank_00001.safetensors"),
])
def test_failed_save_on_one_rank_ends_every_rank(tmp_path, what, glob):
    run = tmp_path / "run"
    proc = faulty_train(run, "ENOSPC", glob, "parallel.tp=2", nproc=2)  # timeout: no hang
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "train: error:" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert "No space left on device" in errors[0]
    assert f'File "{ROOT / "remax_megatron"}' not in proc.stderr  # no traceback of ours
    assert_step_1_kept(run, errors[0])


# --- D: pruning ---------------------------------------------------------------------------------
def _fake_checkpoints(root: Path, complete: list[str], incomplete=(), others=()) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in complete:  # what a finished save leaves (models/locate.py is_complete)
        (root / name / "model").mkdir(parents=True)
        for file in ("trainer_state.json", "remax_checkpoint.json", "model/metadata.json"):
            (root / name / file).write_text(json.dumps({"step": 0}))
    for name in incomplete:
        (root / name).mkdir()
    for name in others:
        (root / name).mkdir()
        (root / name / "trainer_state.json").write_text("{}")


def _left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "latest")


def test_prune_by_step_number_not_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, ["step_99", "step_000100"])
    (root / "latest").write_text("step_000100\n")
    _prune(root, keep_last=1, saved_step=100)
    # by name, "step_000100" < "step_99": the old code removed the checkpoint just saved
    assert _left(root) == ["step_000100"]


def test_prune_spares_what_is_not_its_to_remove(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, ["step_000001", "step_000002", "step_000003", "step_000004",
                             "step_000005", "step_000010"],
                      incomplete=["step_000000"],
                      others=["step_000002_best", "my_step_000001", "step_x", "steps_000001"])
    (root / "step_2").symlink_to(root / "step_000002_best")  # complete-looking, a link
    (root / "latest").write_text("step_000001\n")  # e.g. a resume from an old checkpoint
    _prune(root, keep_last=2, saved_step=5)
    # of this run's complete checkpoints the newest two stay, and step_000001 (latest);
    # step_000010 (a later run's), step_000000 (incomplete), the link and the directories not
    # named step_<digits> are not touched
    assert _left(root) == ["my_step_000001", "step_000000", "step_000001", "step_000002_best",
                           "step_000004", "step_000005", "step_000010", "step_2", "step_x",
                           "steps_000001"]


def test_prune_keeps_everything_with_keep_last_zero(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoints(root, ["step_000001", "step_000002", "step_000003"])
    _prune(root, keep_last=0, saved_step=3)
    assert _left(root) == ["step_000001", "step_000002", "step_000003"]
