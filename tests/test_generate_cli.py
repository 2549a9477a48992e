"""`remax-megatron generate` end to end: prompt and chat rows, output in input order, greedy
responses equal transformers' greedy generate on the same text; the same file under torchrun
(dp=2, and tp=2); bad input lines fail with one line before any model is built."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_python, run_torchrun
from remax_megatron import tiny
from remax_megatron.convert.commands import hf_to_mcore

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
    return {"root": root, "ckpt": ckpt, "expected": expected}


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


def test_single_process(setup):
    out = setup["root"] / "out1.jsonl"
    run_python(["-m", "remax_megatron", "generate", "--load", str(setup["ckpt"]), "--input",
                str(setup["root"] / "in.jsonl"), "--output", str(out), "--greedy",
                "--max-new-tokens", str(NEW), "--batch-size", "2"])
    check_output(read_output(out), setup["expected"])


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
