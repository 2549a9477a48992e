"""What a user watches while training: sample responses with their rewards (progress output,
samples.jsonl, TensorBoard text), a held-out evaluation with greedy decoding (eval/reward,
checked against transformers' greedy generate on the exported weights), checkpoint.export_hf,
--print-config, --version, --log-level after the verb, an ETA, and quiet third-party warnings."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
import yaml

from conftest import run_metrics, run_python
from remax_megatron.cli import build_parser, main
from remax_megatron.config_io import from_dict
from remax_megatron.training import demo
from remax_megatron.training.config import RunConfig, load_config

EVAL_PROMPTS = ["tell me about the sea", "describe a tall tree", "a note on rain and snow"]
NEW = 6


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    root = tmp_path_factory.mktemp("watch")
    (root / "eval.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                             for p in EVAL_PROMPTS))
    run = root / "run"
    proc = run_python(["-m", "remax_megatron", "train", "--output-dir", str(run),
                       "train.steps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
                       f"rollout.max_new_tokens={NEW}", "log.samples_every=1", "log.samples=2",
                       f"data.eval_path={root / 'eval.jsonl'}", "log.eval_every=1",
                       "checkpoint.export_hf=true"])
    return run, proc


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_are_shown_written_and_in_tensorboard(watched):
    run, proc = watched
    rows = read_jsonl(run / "samples.jsonl")
    assert [r["step"] for r in rows] == [1, 1, 2, 2]
    for r in rows:
        assert set(r) == {"step", "prompt", "greedy", "sampled"} and len(r["sampled"]) == 1
        for answer in [r["greedy"], *r["sampled"]]:
            # each reward belongs to its own response: recomputed from the text
            assert answer["reward"] == pytest.approx(
                demo.vowel_share([r["prompt"]], [answer["response"]])[0], abs=1e-6)
        assert f"prompt: {r['prompt']!r}" in proc.stderr
    assert "samples at step 2:" in proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2]
    assert rows[0]["prompt"] in texts[0].tensor_proto.string_val[0].decode()


def test_eval_reward_is_the_greedy_reward_of_the_exported_model(watched):
    run, proc = watched
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert all(e["eval/prompts"] == len(EVAL_PROMPTS) for e in evals)
    metrics = run_metrics(run)
    assert [m["eval/reward"] for m in metrics] == [e["eval/reward"] for e in evals[1:]]
    assert "eval at step 0: reward" in proc.stderr
    # the reference: transformers' greedy generate on the exported final weights, scored by the rule
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    responses = []
    for prompt in EVAL_PROMPTS:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        responses.append(tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True))
    want = sum(demo.vowel_share(EVAL_PROMPTS, responses)) / len(EVAL_PROMPTS)
    assert evals[-1]["eval/reward"] == pytest.approx(want, abs=1e-6)


def test_progress_line_has_an_eta(watched):
    _, proc = watched
    assert "step 1/2 |" in proc.stderr and "| eta " in proc.stderr


def test_print_config_prints_every_default_and_exits(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--print-config", f"output_dir={out}", "train.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.5
    assert printed["algorithm"]["kl_coef"] == 0.0  # the algorithm's default, resolved
    assert printed["log"]["samples_every"] == 10
    assert from_dict(RunConfig, printed) == load_config(
        None, [f"output_dir={out}", "train.lr=0.5"], base=demo.config())
    assert not out.exists()  # nothing started


@pytest.mark.parametrize("override,needle", [
    ("train.lr=1e30", "train.lr=1e+30 must be a learning rate in [0, 1]"),
    ("rollout.n_samples=0", "rollout.n_samples=0 must be at least 1"),
])
def test_print_config_refuses_what_train_refuses(tmp_path, capsys, override, needle):
    assert main(["train", "--print-config", f"output_dir={tmp_path}", override]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in captured.err


def test_print_config_of_a_tp2_run_outside_torchrun(tmp_path, capsys):
    assert main(["train", "--print-config", f"output_dir={tmp_path}", "parallel.tp=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["parallel"]["tp"] == 2


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("remax-megatron ") and f"megatron-core {version('megatron-core')}" in line


@pytest.mark.parametrize("argv", [["--log-level", "WARNING", "train"],
                                  ["train", "--log-level", "WARNING"],
                                  ["convert", "mcore-to-hf", "--load", "x", "--out", "y",
                                   "--log-level", "WARNING"],
                                  ["generate", "--load", "x", "--input", "i", "--output", "o",
                                   "--log-level", "WARNING"]])
def test_log_level_before_or_after_the_verb(argv):
    assert build_parser().parse_args(argv).log_level == "WARNING"
    assert build_parser().parse_args([a for a in argv if a not in ("--log-level", "WARNING")]
                                     ).log_level == "INFO"


def test_repeated_third_party_warnings_are_filtered_others_are_not():
    from remax_megatron.logging_utils import setup_logging

    seen_in_runs = [  # as megatron-core and torch print them on every rank
        "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
        "Please use DTensor instead and we are deprecating ShardedTensor.",
        "`load_state_dict` is deprecated and will be removed in future versions. Please use "
        "`load` instead.",
        "When using async grad allreduce it is recommended to set the environment variable "
        "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup",
        "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
        "`torch.distributed.reduce_scatter_single` instead.",
    ]
    with warnings.catch_warnings(record=True) as caught:
        setup_logging("INFO")
        for message in seen_in_runs:
            warnings.warn(message, UserWarning)
        warnings.warn("a warning of the user's own", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]
