"""Conversion inputs in every storage form, and bad input: one line that says what to change,
before any model is built, with nothing left in --out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_python
from remax_megatron import tiny
from remax_megatron.config_io import ConfigError
from remax_megatron.convert.commands import hf_to_mcore, mcore_to_hf


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(300)


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    model = tiny.build_hf_model("LlamaForCausalLM", len(tokenizer), num_hidden_layers=2)
    return tiny.save_hf(model, tokenizer, tmp_path / "hf")


def assert_clean(out: Path):
    assert not out.exists() or not any(out.iterdir()), "a failed conversion left files in --out"
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temporary directory was left"


def expect_error(hf_dir, out, needle, **kw):
    with pytest.raises(ConfigError) as err:
        hf_to_mcore(hf_dir, out, **kw)
    message = str(err.value)
    assert needle in message, message
    assert "\n" not in message
    assert_clean(out)


def test_unsupported_architecture(llama_dir, tmp_path):
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    expect_error(llama_dir, tmp_path / "out", "architecture BertForMaskedLM is not supported: use "
                 "one of GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM")


def test_missing_shard_of_a_sharded_checkpoint(tmp_path, tokenizer):
    model = tiny.build_hf_model("GPT2LMHeadModel", len(tokenizer))
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    expect_error(tmp_path / "hf", tmp_path / "out",
                 f"lists 1 weight file(s) that are missing, first {shards[1].name}: download them")


def test_truncated_weight_file(llama_dir, tmp_path):
    path = llama_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    expect_error(llama_dir, tmp_path / "out", "is truncated")


@pytest.mark.parametrize("damage", ["huge_length", "header_not_a_mapping", "unknown_dtype"])
def test_corrupt_safetensors_header(llama_dir, tmp_path, damage):
    """An OverflowError / KeyError / AttributeError before (issue 18)."""
    import struct

    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    if damage == "huge_length":
        data = struct.pack("<Q", 2 ** 63 + 5) + data[8:]
    else:
        name = next(k for k in header if k != "__metadata__")
        header = [1, 2] if damage == "header_not_a_mapping" else {
            **header, name: {**header[name], "dtype": "Q7"}}
        text = json.dumps(header).encode()
        data = struct.pack("<Q", len(text)) + text + data[8 + length:]
    path.write_bytes(data)
    expect_error(llama_dir, tmp_path / "out", "model.safetensors is not a readable safetensors "
                 "file (truncated or corrupt?): download it again")


def test_out_where_no_directory_can_be_made(llama_dir, tmp_path):
    (tmp_path / "afile").write_text("x")  # an OSError (NotADirectoryError) before (issue 18)
    with pytest.raises(ConfigError, match=r"cannot make the temporary directory .*afile/\.out\.tmp-"
                                          r"\d+ next to --out \(Not a directory\): choose an --out "
                                          "in a writable directory"):
        hf_to_mcore(llama_dir, tmp_path / "afile" / "out")


def test_no_weights_at_all(llama_dir, tmp_path):
    (llama_dir / "model.safetensors").unlink()
    expect_error(llama_dir, tmp_path / "out", "has no weights (model.safetensors, its index, or "
                 "pytorch_model.bin)")


def test_config_and_weights_disagree(llama_dir, tmp_path):
    config = json.loads((llama_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (llama_dir / "config.json").write_text(json.dumps(config))
    expect_error(llama_dir, tmp_path / "out", "model.layers.0.mlp.gate_proj.weight has shape "
                 "(96, 64) but config.json implies (128, 64): the weights and config.json disagree")


def test_weights_with_layers_the_config_lacks(llama_dir, tmp_path):
    config = json.loads((llama_dir / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (llama_dir / "config.json").write_text(json.dumps(config))
    expect_error(llama_dir, tmp_path / "out", "the weights hold model.layers.1.")


def test_out_not_empty_needs_force(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="is not empty: choose a new directory or pass --force"):
        hf_to_mcore(llama_dir, out)
    assert (out / "keep.txt").read_text() == "precious"
    hf_to_mcore(llama_dir, out, force=True)
    assert (out / "remax_checkpoint.json").is_file() and not (out / "keep.txt").exists()


def test_out_never_replaces_the_source(llama_dir, tmp_path):
    """--force replaces --out as a whole: --out the source, a parent of it or inside it is
    refused (both ways), the source intact."""
    before = sorted(p.name for p in llama_dir.iterdir())
    for out, how in ((llama_dir, "the same path as"), (llama_dir.parent, "contains"),
                     (llama_dir / "sub", "lies inside")):
        with pytest.raises(ConfigError, match=f"^--out .* {how} --hf .*choose an --out apart"):
            hf_to_mcore(llama_dir, out, force=True)
    ckpt = hf_to_mcore(llama_dir, tmp_path / "mcore")
    for out, how in ((ckpt, "the same path as"), (tmp_path, "contains"),
                     (ckpt / "hf", "lies inside")):
        with pytest.raises(ConfigError, match=f"^--out .* {how} --load "):
            mcore_to_hf(ckpt, out, force=True)
    assert sorted(p.name for p in llama_dir.iterdir()) == before
    assert (ckpt / "remax_checkpoint.json").is_file()


def test_a_converted_checkpoint_carries_checksums_that_catch_a_flipped_byte(
        llama_dir, tmp_path, monkeypatch):
    ckpt = hf_to_mcore(llama_dir, tmp_path / "mcore")
    listed = json.loads((ckpt / "checksums.json").read_text())["files"]
    assert "remax_checkpoint.json" in listed and any(n.startswith("model/") for n in listed)
    shard = max((ckpt / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"^{shard} is corrupted \\(crc32 [0-9a-f]{{8}}, "
                       "[0-9a-f]{8} when saved\\): copy the checkpoint again"):
        mcore_to_hf(ckpt, tmp_path / "back")
    assert_clean(tmp_path / "back")
    monkeypatch.setenv("REMAX_SKIP_CHECKSUMS", "1")  # a checkpoint the user trusts
    assert (mcore_to_hf(ckpt, tmp_path / "back") / "config.json").is_file()


def test_missing_tokenizer_is_a_warning(tmp_path, caplog):
    model = tiny.build_hf_model("GPT2LMHeadModel", 300)
    hf_dir = tiny.save_hf(model, None, tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="remax_megatron"):
        out = hf_to_mcore(hf_dir, tmp_path / "out")
    assert any("has no tokenizer files" in r.getMessage() for r in caplog.records)
    assert (out / "remax_checkpoint.json").is_file() and not (out / "tokenizer").exists()


def test_reward_flag_on_a_causal_lm(llama_dir, tmp_path):
    expect_error(llama_dir, tmp_path / "out", "--model-type reward needs a sequence classifier",
                 model_type="reward")


@pytest.mark.parametrize("storage", ["bin", "sharded_safetensors"])
def test_other_storage_forms_round_trip(storage, tmp_path, tokenizer):
    model = tiny.build_hf_model("LlamaForCausalLM", len(tokenizer), num_hidden_layers=2)
    if storage == "bin":
        # transformers 5 writes only safetensors; older releases and many hub repos have .bin
        model.config.save_pretrained(tmp_path / "hf")
        original = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(original, tmp_path / "hf" / "pytorch_model.bin")
    else:
        model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
        original = {}
        for shard in (tmp_path / "hf").glob("model-*.safetensors"):
            original.update(load_file(str(shard)))
    ckpt = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    out = mcore_to_hf(ckpt, tmp_path / "back", max_shard_gib=100 / 2**20)  # several shards
    exported = {}
    for shard in out.glob("*.safetensors"):
        exported.update(load_file(str(shard)))
    assert (out / "model.safetensors.index.json").is_file()
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def test_bf16_stays_bf16_bit_for_bit(tmp_path, tokenizer):
    model = tiny.build_hf_model("GPT2ForSequenceClassification", len(tokenizer))
    hf_dir = tiny.save_hf(model, tokenizer, tmp_path / "hf", dtype=torch.bfloat16)
    ckpt = hf_to_mcore(hf_dir, tmp_path / "mcore")
    assert json.loads((ckpt / "remax_checkpoint.json").read_text())["dtype"] == "bf16"
    out = mcore_to_hf(ckpt, tmp_path / "back")
    original, exported = load_file(str(hf_dir / "model.safetensors")), \
        load_file(str(out / "model.safetensors"))
    assert set(original) == set(exported)
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v)
               for k, v in original.items())


def test_export_of_a_non_checkpoint_says_what_to_do(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="is not a remax-megatron checkpoint: no "
                                          "remax_checkpoint.json .it looks like a Hugging Face"):
        mcore_to_hf(llama_dir, tmp_path / "out")
    assert_clean(tmp_path / "out")


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    proc = run_python(["-m", "remax_megatron", "convert", "hf-to-mcore", "--hf",
                       str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"remax-megatron convert: error: --hf {tmp_path / 'nowhere'} does not exist")


def test_tool_script_is_the_same_entry(tmp_path, llama_dir):
    proc = run_python(["tools/convert_checkpoint.py", "hf-to-mcore", "--hf", str(llama_dir),
                       "--out", str(tmp_path / "out")])
    assert proc.returncode == 0 and (tmp_path / "out" / "remax_checkpoint.json").is_file()


def test_export_of_a_training_run_directory(llama_dir, tmp_path):
    """--load RUN: the newest complete step (not the save in progress), exported as from the
    step itself."""
    ckpt = hf_to_mcore(llama_dir, tmp_path / "mcore")
    steps = tmp_path / "run" / "checkpoints"
    for name in ("step_000002", ".step_000004.tmp"):
        (steps / name).mkdir(parents=True)
        for entry in ckpt.iterdir():
            (steps / name / entry.name).symlink_to(entry)
    (steps / "step_000002" / "trainer_state.json").write_text("{}")
    out = mcore_to_hf(tmp_path / "run", tmp_path / "back")
    original, exported = load_file(str(llama_dir / "model.safetensors")), \
        load_file(str(out / "model.safetensors"))
    assert set(original) == set(exported)
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def test_export_of_a_run_without_checkpoints_names_the_flag(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"^--load .*run: .*holds no complete checkpoint"):
        mcore_to_hf(tmp_path / "run", tmp_path / "out")
    assert_clean(tmp_path / "out")
