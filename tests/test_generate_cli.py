"""`remax-megatron generate` end to end: prompt and chat rows, output in input order, greedy
responses equal transformers' greedy generate on the same text; the same file under torchrun
(dp=2, and tp=2); --load of a training run directory; bad input fails with one line before any
model is built."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import greedy_until_near_tie, run_python, run_torchrun
from remax_megatron import cli, tiny
from remax_megatron.convert.commands import hf_to_mcore
from remax_megatron.rollout import generate_command
from remax_megatron.runtime import precision

ROWS = [
    {"prompt": "hello world"},
    {"messages": [{"role": "user", "content": "how are you today ?"}]},
    {"prompt": "the quick brown fox jumps over the lazy dog ."},
    {"prompt": "a"},
    {"prompt": "red green blue yellow"},
]
NEW = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_cli")
    tokenizer = tiny.build_tokenizer(300)
    model = tiny.build_hf_model("LlamaForCausalLM", len(tokenizer), seed=4)
    ckpt = hf_to_mcore(tiny.save_hf(model, tokenizer, root / "hf"), root / "ckpt")
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected = []
    for row in ROWS:
        if "prompt" in row:
            ids = tokenizer(row["prompt"]).input_ids
        else:
            ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if not isinstance(ids, list) else ids
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        expected.append(out[0, len(ids):].tolist())
    return {"root": root, "ckpt": ckpt, "expected": expected, "model": model}


def read_output(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_output(rows, expected):
    assert len(rows) == len(ROWS)
    for row, want, source in zip(rows, expected, ROWS):
        assert set(row) == {"prompt", "response", "response_ids", "finish_reason"}
        assert row["response_ids"] == want
        assert row["finish_reason"] in ("eos", "length")
        if "prompt" in source:
            assert row["prompt"] == source["prompt"]
        else:
            assert row["prompt"].startswith("<|user|>how are you today ?")


def greedy_args(load, input, output) -> list[str]:
    return ["-m", "remax_megatron", "generate", "--load", str(load), "--input", str(input),
            "--output", str(output), "--greedy", "--max-new-tokens", str(NEW), "--batch-size", "2"]


@pytest.fixture(scope="module")
def explicit_output(setup) -> Path:
    """Greedy output with --load naming the checkpoint directory itself."""
    out = setup["root"] / "out1.jsonl"
    run_python(greedy_args(setup["ckpt"], setup["root"] / "in.jsonl", out))
    return out


def test_single_process(setup, explicit_output):
    check_output(read_output(explicit_output), setup["expected"])


def link_checkpoint(source: Path, target: Path) -> Path:
    """``target`` as a copy of checkpoint ``source`` made of symlinks (cheap, and its own files
    can be added or replaced without touching ``source``)."""
    target.mkdir(parents=True)
    for entry in source.iterdir():
        (target / entry.name).symlink_to(entry.resolve())
    return target


def test_load_of_a_run_directory(setup, explicit_output, tmp_path):
    """A training run's OUTPUT resolves to its newest complete checkpoint: step 2 here, as the
    step-4 directory is a save still in progress."""
    run = tmp_path / "run"
    step = link_checkpoint(setup["ckpt"], run / "checkpoints" / "step_000002")
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    link_checkpoint(setup["ckpt"], run / "checkpoints" / ".step_000004.tmp")
    (run / "checkpoints" / "latest").write_text("step_000002\n")
    out = tmp_path / "out.jsonl"
    proc = run_python(greedy_args(run, setup["root"] / "in.jsonl", out))
    assert f"--load {run}: using {step} (named by latest)" in proc.stderr
    assert out.read_text() == explicit_output.read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--tp", "1"], ["--tp", "2"]], ids=["dp2", "tp2"])
def test_under_torchrun(setup, layout, tmp_path):
    out = tmp_path / "out.jsonl"
    run_torchrun(2, ["-m", "remax_megatron", "generate", "--load", str(setup["ckpt"]),
                     "--input", str(setup["root"] / "in.jsonl"), "--output", str(out),
                     "--max-new-tokens", str(NEW), *layout])
    check_output(read_output(out), setup["expected"])


def test_sampling_flags_and_seed(setup, tmp_path):
    args = ["-m", "remax_megatron", "generate", "--load", str(setup["ckpt"]), "--input",
            str(setup["root"] / "in.jsonl"), "--max-new-tokens", str(NEW), "--temperature", "1.0",
            "--top-p", "0.9", "--top-k", "40", "--seed", "3"]
    run_python(args + ["--output", str(tmp_path / "a.jsonl")])
    run_python(args + ["--output", str(tmp_path / "b.jsonl"), "--batch-size", "1"])
    a, b = read_output(tmp_path / "a.jsonl"), read_output(tmp_path / "b.jsonl")
    assert a == b, "a row's samples must not depend on batching"
    assert [r["response_ids"] for r in a] != setup["expected"]


BF16_TIE = 0.05  # HF's top-2 logit gap below which bf16 rounding may pick either token


@pytest.mark.skipif(not precision.bf16_supported(), reason="no native bf16 on this machine")
def test_bf16_greedy_equals_transformers_bf16(setup, tmp_path):
    """--dtype bf16 on the fp32 checkpoint: the same tokens as transformers' bf16 model up to
    the first near-tie (the bf16 path every GPU user runs, here on the CPU's bf16 kernels)."""
    hf = copy.deepcopy(setup["model"]).to(torch.bfloat16)
    tokenizer = tiny.build_tokenizer(300)
    rows = [r for r in ROWS if "prompt" in r]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    new = 16
    proc = run_python(["-m", "remax_megatron", "generate", "--load", str(setup["ckpt"]),
                       "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                       "--greedy", "--max-new-tokens", str(new), "--dtype", "bf16"])
    assert "(tp=1 pp=1, bf16)" in proc.stderr  # the fp32 checkpoint's weights, cast
    compared = 0
    for row, ours in zip(rows, read_output(tmp_path / "o.jsonl")):
        want = greedy_until_near_tie(hf, tokenizer(row["prompt"]).input_ids, new, BF16_TIE)
        assert ours["response_ids"][:len(want)] == want, row
        compared += len(want)
    assert compared >= 2 * len(rows), f"only {compared} tokens before near-ties: raise the seed's margin"


@pytest.mark.parametrize("line,needle", [
    ("{not json", "in.jsonl line 2 is not valid JSON"),
    ('{"text": "hi"}', 'row 2 needs a "prompt" string or a non-empty "messages" list'),
])
def test_bad_input_is_one_line(setup, tmp_path, line, needle):
    bad = tmp_path / "in.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    proc = run_python(["-m", "remax_megatron", "generate", "--load", str(setup["ckpt"]),
                       "--input", str(bad), "--output", str(tmp_path / "o.jsonl")], check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("remax-megatron generate: error:") and needle in last
    assert not (tmp_path / "o.jsonl").exists()


@pytest.fixture(scope="module")
def reward_ckpt(setup) -> Path:
    """The test checkpoint relabelled as a reward model: the check reads only its metadata."""
    ckpt = link_checkpoint(setup["ckpt"], setup["root"] / "reward")
    meta = json.loads((ckpt / "remax_checkpoint.json").read_text())
    (ckpt / "remax_checkpoint.json").unlink()
    meta.update(kind="reward", architecture="LlamaForSequenceClassification")
    (ckpt / "remax_checkpoint.json").write_text(json.dumps(meta))
    return ckpt


@pytest.fixture
def places(setup, reward_ckpt, tmp_path) -> dict:
    """What the bad-input cases point at."""
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run that has saved nothing yet
    return {"tmp": tmp_path, "file": tmp_path / "afile", "run": tmp_path / "run",
            "root": setup["root"], "ckpt": setup["ckpt"], "reward": reward_ckpt}


def generate_argv(places: dict, changes: dict) -> list[str]:
    """Good arguments with ``changes`` ({flag: value or None for a bare flag}) applied."""
    flags = {"--load": "{ckpt}", "--input": "{root}/in.jsonl", "--output": "{tmp}/o.jsonl",
             "--max-new-tokens": str(NEW), **changes}
    argv = ["generate"]
    for flag, value in flags.items():
        argv += [flag] if value is None else [flag, value.format(**places)]
    return argv


# name: (changes to good arguments, what the one-line error says)
BAD_INPUT = {
    "output_is_a_directory": ({"--output": "{tmp}"}, "is a directory: give a file path"),
    "output_ends_in_a_slash": ({"--output": "{tmp}/new/"}, "is a directory: give a file path"),
    "output_under_a_file": ({"--output": "{file}/o.jsonl"}, "afile is a file, not a directory"),
    "output_deep_under_a_file": ({"--output": "{file}/a/b/o.jsonl"},
                                 "afile is a file, not a directory"),
    "output_is_a_device": ({"--output": "/dev/null"}, "exists and is not a regular file"),
    "output_name_too_long": ({"--output": "{tmp}/" + "x" * 250 + ".jsonl"},
                             "cannot write there (File name too long)"),
    "output_in_procfs": ({"--output": "/proc/o.jsonl"}, "cannot create a file in /proc"),
    "output_is_the_input": ({"--output": "{root}/in.jsonl"}, "the same path as --input"),
    "output_inside_the_checkpoint": ({"--output": "{ckpt}/o.jsonl"}, "lies inside --load"),
    "input_missing": ({"--input": "{tmp}/nothing.jsonl"}, "nothing.jsonl is not a file"),
    "input_is_a_directory": ({"--input": "{tmp}"}, "is not a file"),
    "load_missing": ({"--load": "{tmp}/nowhere"}, "nowhere does not exist"),
    "load_run_without_checkpoint": ({"--load": "{run}"}, "holds no complete checkpoint"),
    "load_hugging_face_dir": ({"--load": "{root}/hf"}, "run remax-megatron convert hf-to-mcore"),
    "load_reward_model": ({"--load": "{reward}"}, "is a reward model "
                          "(LlamaForSequenceClassification): generate needs a causal LM"),
    "tp_zero": ({"--tp": "0"}, "tp must be a positive integer"),
    "tp_beyond_world_size": ({"--tp": "2"}, "world size 1 is not divisible by tp*pp"),
    "temperature_zero": ({"--temperature": "0"}, "temperature=0.0 must be in (0, 100]"),
    "temperature_infinite": ({"--temperature": "inf"}, "temperature=inf must be in (0, 100]"),
    "temperature_nan": ({"--temperature": "nan"}, "temperature=nan must be in (0, 100]"),
    "top_p_above_one": ({"--top-p": "1.5"}, "top_p=1.5 must be in (0, 1]"),
    "top_p_zero": ({"--top-p": "0"}, "top_p=0.0 must be in (0, 1]"),
    "top_k_negative": ({"--top-k": "-1"}, "top_k=-1 must be >= 0"),
    "greedy_and_sampling": ({"--greedy": None, "--temperature": "0.7"},
                            "--greedy takes no --temperature"),
    "max_new_tokens_zero": ({"--max-new-tokens": "0"}, "must be at least 1"),
    "batch_size_zero": ({"--batch-size": "0"}, "must be at least 1"),
    "pipeline_micro_batches_negative": ({"--pipeline-micro-batches": "-1"}, "must be >= 0"),
    "seed_beyond_torch": ({"--seed": str(2 ** 64)}, f"--seed {2 ** 64} must be in [0, 2**63 - 1]"),
    "seed_negative": ({"--seed": "-1"}, "--seed -1 must be in [0, 2**63 - 1]"),
    **({} if torch.cuda.is_available() else {
        "fp16_on_cpu": ({"--dtype": "fp16"}, "--dtype=fp16 needs a GPU")}),
}


def tripwire(*args, **kwargs):
    raise AssertionError("bad input must fail before the tokenizer, process groups or weights")


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_arguments_fail_before_loading(places, case, capsys, monkeypatch):
    from remax_megatron.runtime import distributed

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("remax_megatron.logging_utils.setup_logging", lambda level: None)
    for module, name in ((generate_command, "load_tokenizer"), (generate_command, "load_model"),
                         (distributed, "init_runtime")):
        monkeypatch.setattr(module, name, tripwire)
    changes, needle = BAD_INPUT[case]
    assert cli.main(generate_argv(places, changes)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("remax-megatron generate: error: ") and needle in lines[0], lines
    assert not (places["tmp"] / "o.jsonl").exists()
    assert not [p.name for p in places["tmp"].glob(".*")], "a probe file was left behind"


@pytest.mark.parametrize("case", ["output_is_a_directory", "output_under_a_file",
                                  "load_reward_model", "input_missing"])
def test_bad_arguments_from_the_command_line(places, case):
    """The same, as a user runs it: exit code 2, one stderr line, no model loaded."""
    changes, needle = BAD_INPUT[case]
    proc = run_python(["-m", "remax_megatron", *generate_argv(places, changes)], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("remax-megatron generate: error: ") and needle in lines[0]
    assert "loaded" not in proc.stderr


def help_by_flag(argv: list[str], capsys) -> dict[str, str]:
    """{flag: its help text, on one line} from ``argv --help``."""
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    blocks = re.split(r"\n  (?=-)", options)  # each option starts a line with "  -"
    return {block.split()[0].rstrip(","): " ".join(block.split()) for block in blocks
            if block.strip()}


def test_help_shows_every_default(capsys):
    helps = help_by_flag(["generate"], capsys)
    for flag, default in (("--max-new-tokens", "128"), ("--tp", "1"), ("--pp", "1"),
                          ("--seed", "0"), ("--batch-size", "16"),
                          ("--pipeline-micro-batches", "0"), ("--dtype", "auto")):
        assert f"(default: {default})" in helps[flag], helps[flag]
    for flag, when_sampling in (("--temperature", "1.0"), ("--top-p", "1.0"), ("--top-k", "0")):
        assert f"(default: unset: greedy; {when_sampling}" in helps[flag], helps[flag]
    for flag in ("--greedy", "--tokenizer"):
        assert "default" in helps[flag], helps[flag]
    for argv, flags in ((["convert", "mcore-to-hf"], ("--max-shard-gib", "--force")),
                        (["convert", "hf-to-mcore"], ("--dtype", "--model-type", "--force"))):
        helps = help_by_flag(argv, capsys)
        assert all("(default: " in helps[flag] for flag in flags), helps
