"""SFT and reward-model training (`remax-megatron sft`, `remax-megatron train-rm`): their rows, by
hand; their loss and gradients at tp2, pp2 and dp2 against a single-process transformers
computation; bad rows; exact resume; and the pipeline SFT -> reward model -> RL through the CLI."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    WORKERS, full_and_resumed_runs, read_json, run_metrics, run_python, run_torchrun, same_run,
)
from remax_megatron import tiny
from remax_megatron.config_io import ConfigError
from remax_megatron.convert import rules
from remax_megatron.convert.commands import family_module, hf_to_mcore
from remax_megatron.data.loader import PromptLoader
from remax_megatron.data.pairs import load_pairs
from remax_megatron.data.sft import load_sft
from remax_megatron.models.hf_config import from_hf_config

WORKER = str(WORKERS / "finetune_equivalence.py")
WORDS = "the quick brown fox jumps over a lazy dog red green blue cats birds sing".split()
TOL = 2e-5


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_rows(count: int, seed: int = 0) -> list[dict]:
    """Half prompt/response rows, half two-turn chats (both assistant turns trained)."""
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    rows = []
    for i in range(count):
        if i % 2:
            rows.append({"prompt": text(2, 6), "response": text(1, 5)})
        else:
            rows.append({"messages": [{"role": "user", "content": text(1, 4)},
                                      {"role": "assistant", "content": text(1, 4)},
                                      {"role": "user", "content": text(1, 3)},
                                      {"role": "assistant", "content": text(1, 4)}]})
    return rows


def pair_rows(count: int, seed: int = 1) -> list[dict]:
    rows = sft_rows(2 * count, seed)[1::2]
    return [{"prompt": r["prompt"], "chosen": r["response"], "rejected": r["response"] + " dog"}
            for r in rows]


# --- rows, by hand -----------------------------------------------------------------------------
def test_prompt_response_rows_train_the_response_and_eos_only(tmp_path):
    tok = tiny.build_tokenizer(300)
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "the quick fox", "completion": "red sun"}])
    [row] = load_sft(path, tok)
    prompt = tok("the quick fox").input_ids
    answer = tok("red sun", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert row.ids == prompt + answer
    assert row.trained == [0] * len(prompt) + [1] * len(answer)


def test_chat_rows_train_every_assistant_turn_and_nothing_else(tmp_path):
    tok = tiny.build_tokenizer(300)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "red dog"},
                {"role": "user", "content": "and"}, {"role": "assistant", "content": "blue cat"}]
    [row] = load_sft(write_rows(tmp_path / "d.jsonl", [{"messages": messages}]), tok)
    text = "<|user|>hello\n<|assistant|>red dog\n<|user|>and\n<|assistant|>blue cat\n"
    assert tok.decode(row.ids) == text
    spans, current = [], []
    for token, on in zip(row.ids, row.trained):
        if on:
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    spans += [current] if current else []
    # the assistant's words and the template's end of turn; the role tags are context
    assert [tok.decode(s) for s in spans] == ["red dog\n", "blue cat\n"]


def test_pairs_in_chat_form_equal_the_prompt_form(tmp_path):
    tok = tiny.build_tokenizer(300)
    user = [{"role": "user", "content": "the fox"}]
    chat = {"chosen": user + [{"role": "assistant", "content": "red"}],
            "rejected": user + [{"role": "assistant", "content": "blue"}]}
    flat = {"prompt": user, "chosen": "red", "rejected": "blue"}
    a, b = load_pairs(write_rows(tmp_path / "d.jsonl", [chat, flat]), tok)
    assert (a.chosen, a.rejected) == (b.chosen, b.rejected)
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    assert a.chosen == prompt + tok("red", add_special_tokens=False).input_ids + [
        tok.eos_token_id]


@pytest.mark.parametrize("loader, rows, needle", [
    (load_sft, [{"prompt": "a"}, {"prompt": "b", "response": "c"}, {"prompt": "d"}],
     'd.jsonl: 2 row(s) lack "prompt" and "response" (or "completion") strings, or "messages" '
     "(rows 1, 3)"),
    (load_sft, [{"prompt": "a", "response": "  "}], "1 row(s) have an empty response (rows 1)"),
    (load_sft, [{"messages": [{"role": "user", "content": "a"}]}],
     "have no assistant message to train on"),
    (load_pairs, [{"prompt": "a", "chosen": "x", "rejected": "x"}],
     "have chosen == rejected (nothing to prefer) (rows 1)"),
    (load_pairs, [{"prompt": "a", "chosen": "x"}], 'lack "chosen" and "rejected"'),
    (load_pairs, [{"prompt": "a", "chosen": "", "rejected": "y"}],
     "have an empty chosen or rejected response"),
    (load_pairs, [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                 "content": "x"}],
                   "rejected": [{"role": "user", "content": "b"},
                                {"role": "assistant", "content": "y"}]}],
     "differ before their last turn"),
])
def test_bad_rows_are_one_line_naming_them(tmp_path, loader, rows, needle):
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(ConfigError) as err:
        loader(path, tiny.build_tokenizer(300))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_rows_longer_than_the_limit_are_dropped_and_counted(tmp_path, caplog):
    tok = tiny.build_tokenizer(300)
    rows = load_sft(write_rows(tmp_path / "d.jsonl", sft_rows(6)), tok)
    limit = sorted(len(r.ids) for r in rows)[-2]  # the longest row is over it
    with caplog.at_level(logging.WARNING):
        loader = PromptLoader(rows, limit, 2, 0, what="rows", limit="data.max_length")
    assert len(loader.prompts) == sum(len(r.ids) <= limit for r in rows) < 6
    assert f"dropped {6 - len(loader.prompts)} of 6 rows longer than data.max_length" in caplog.text


# --- loss and gradients against transformers --------------------------------------------------
def sft_reference(root):
    tok = tiny.build_tokenizer(300)
    model = tiny.build_hf_model("LlamaForCausalLM", len(tok), seed=4)
    ckpt = hf_to_mcore(tiny.save_hf(model, tok, root / "hf"), root / "ckpt")
    rows = sft_rows(8)

    def loss_on(data):
        """The mean over every response token of the rows (the global batch)."""
        nll, tokens = torch.zeros(()), 0
        for row in load_sft(data, tok):
            logits = model(torch.tensor([row.ids])).logits[0, :-1]
            logp = torch.log_softmax(logits, -1).gather(
                -1, torch.tensor(row.ids[1:])[:, None])[:, 0]
            mask = torch.tensor(row.trained[1:], dtype=torch.float32)
            nll, tokens = nll - (logp * mask).sum(), tokens + int(mask.sum())
        return nll / tokens, {}

    return model, ckpt, rows, loss_on


def rm_reference(root):
    """A reward model with a random head (trained further: its backbone gets gradients)."""
    tok = tiny.build_tokenizer(300)
    model = tiny.build_hf_model("LlamaForSequenceClassification", len(tok), seed=5,
                                num_labels=1, pad_token_id=tok.pad_token_id)
    ckpt = hf_to_mcore(tiny.save_hf(model, tok, root / "hf"), root / "ckpt")

    def loss_on(data):
        losses, correct = [], 0
        for pair in load_pairs(data, tok):
            chosen = model(torch.tensor([pair.chosen])).logits[0, 0]
            rejected = model(torch.tensor([pair.rejected])).logits[0, 0]
            losses.append(-F.logsigmoid(chosen - rejected))
            correct += int(chosen > rejected)
        return torch.stack(losses).mean(), {"accuracy": correct / len(losses)}

    return model, ckpt, pair_rows(8), loss_on


def write_reference(root, kind) -> str:
    """The loss and gradients on all 8 rows (one global batch), and the loss (and accuracy) on
    the first 5 as held-out rows: at dp2 one rank evaluates a filler beside its real rows."""
    model, ckpt, rows, loss_on = (sft_reference if kind == "sft" else rm_reference)(root)
    data, held = write_rows(root / "d.jsonl", rows), write_rows(root / "e.jsonl", rows[:5])
    with torch.no_grad():
        eval_loss, eval_extra = loss_on(held)
    loss, extra = loss_on(data)
    model.zero_grad()
    loss.backward()
    info = from_hf_config(model.config.to_dict())
    family = family_module(info.model_type)
    grads = {name: p.grad for name, p in model.named_parameters()}
    expected = dict(rules.to_mcore(family.rules(info.config, kind == "rm"), grads.__getitem__))
    path = root / "ref.pt"
    torch.save({"kind": kind, "checkpoint": str(ckpt), "data": data, "eval": held, "rows": 8,
                "expected_loss": loss.item(), "expected_grads": expected,
                "expected_eval": {"loss": eval_loss.item(), **eval_extra},
                **{f"expected_{k}": v for k, v in extra.items()}}, path)
    return str(path)


LAYOUTS = {"tp2": ["--tp", "2"], "pp2": ["--pp", "2"], "dp2": [],
           "tp2_sp": ["--tp", "2", "--sequence-parallel"]}
CASES = [(kind, layout) for kind in ("sft", "rm") for layout in LAYOUTS
         if not (kind == "rm" and layout == "tp2_sp")]  # (train-rm refuses sequence parallel)


@pytest.mark.distributed
@pytest.mark.parametrize("kind, layout", CASES, ids=[f"{k}-{lay}" for k, lay in CASES])
def test_loss_and_gradients_match_transformers(kind, layout, tmp_path):
    ref = write_reference(tmp_path, kind)
    run_torchrun(2, [WORKER, "--ref", ref, "--report", str(tmp_path / "r.json"),
                     *LAYOUTS[layout]])
    report = read_json(tmp_path / "r.json")
    assert report.pop("names_match") == 0.0
    rows = report.pop("rows")
    assert rows == 8 if kind == "rm" else rows > 8  # every pair / response token counted once
    assert report.pop("loss") < 1e-5
    assert report.pop("accuracy", 0.0) < 1e-9
    assert report.pop("eval/loss") < 1e-5
    assert report.pop("eval/accuracy", 0.0) < 1e-9
    assert report.pop("grad_norm") < TOL
    assert len(report) > 10
    bad = {k: v for k, v in report.items() if not v < TOL}
    assert not bad, f"{kind} {layout}: gradients differ from transformers: {bad}"


# --- through the command line -----------------------------------------------------------------
def tiny_policy(root):
    tok = tiny.build_tokenizer(300)
    model = tiny.build_hf_model("LlamaForCausalLM", len(tok), seed=6)
    return hf_to_mcore(tiny.save_hf(model, tok, root / "hf"), root / "ckpt")


SMALL = ["train.global_batch_size=4", "train.micro_batch_size=2", "log.tensorboard=false",
         "data.max_length=64"]


@pytest.mark.parametrize("verb", ["sft", "train-rm"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(verb, tmp_path):
    """Killed after its step-2 checkpoint and resumed: the same losses, norms and LRs (and the
    reward model's accuracy and margin; it starts from the policy, its head at zero)."""
    rows = sft_rows(12) if verb == "sft" else pair_rows(12)
    data = write_rows(tmp_path / "d.jsonl", rows)
    full, broken = full_and_resumed_runs(
        [f"policy.load={tiny_policy(tmp_path)}", f"data.path={data}", "train.steps=4",
         "checkpoint.save_every=2", "train.lr=1e-3", "train.min_lr=1e-4", *SMALL],
        tmp_path, verb=verb)
    a, b = run_metrics(full), run_metrics(broken)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    same_run(a, b, tol=1e-6)
    if verb == "train-rm":
        assert a[0]["loss"] == pytest.approx(math.log(2))
        for key in ("accuracy", "margin"):
            assert [m[key] for m in a] == pytest.approx([m[key] for m in b], abs=1e-6)


def test_sft_then_reward_model_then_rl(tmp_path):
    """The whole pipeline on one tiny model: SFT lowers the held-out loss; train-rm from the SFT
    checkpoint starts at loss log 2 (head at zero), learns the preference, exports a transformers
    sequence classifier; RL trains the SFT policy against that reward model."""
    policy = tiny_policy(tmp_path)
    sft_data = write_rows(tmp_path / "sft.jsonl", sft_rows(16))
    run_python(["-m", "remax_megatron", "sft", f"policy.load={policy}", f"data.path={sft_data}",
                f"data.eval_path={sft_data}", "train.steps=4", "train.lr=3e-3",
                f"output_dir={tmp_path / 'sft'}", *SMALL])
    evals = [json.loads(line) for line in (tmp_path / "sft" / "eval.jsonl").open()]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert evals[0]["eval/perplexity"] == pytest.approx(math.exp(evals[0]["eval/loss"]))

    pairs = write_rows(tmp_path / "pairs.jsonl", pair_rows(16))
    run_python(["-m", "remax_megatron", "train-rm", f"policy.load={tmp_path / 'sft'}",
                f"data.path={pairs}", f"data.eval_path={pairs}", "train.steps=6",
                "train.lr=3e-3", "checkpoint.export_hf=true", f"output_dir={tmp_path / 'rm'}",
                *SMALL])
    evals = [json.loads(line) for line in (tmp_path / "rm" / "eval.jsonl").open()]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval/accuracy"] == 0.5
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.01
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "hf")
    assert type(hf).__name__ == "LlamaForSequenceClassification"

    run_python(["-m", "remax_megatron", "train", "--config", _rl_config(tmp_path, sft_data),
                f"output_dir={tmp_path / 'rl'}"])
    rl = run_metrics(tmp_path / "rl")
    assert [m["step"] for m in rl] == [1, 2] and all(math.isfinite(m["loss"]) for m in rl)


def _rl_config(root, prompts) -> str:
    import yaml

    path = root / "rl.yaml"
    path.write_text(yaml.safe_dump({
        "policy": {"load": str(root / "sft")}, "reward": {"load": str(root / "rm")},
        "data": {"path": prompts, "max_prompt_length": 48},
        "rollout": {"max_new_tokens": 8}, "train": {"steps": 2, "global_batch_size": 4,
                                                    "micro_batch_size": 2},
        "log": {"tensorboard": False}}))
    return str(path)


@pytest.mark.parametrize("verb, overrides, needle", [
    ("sft", [], "set data.path"),
    ("sft", ["data.path=DATA", "train.global_batch_size=6", "train.micro_batch_size=4"],
     "train.global_batch_size=6 is not divisible by dp x micro_batch_size = 1 x 4"),
    ("train-rm", ["data.path=DATA", "parallel.tp=2", "parallel.sequence_parallel=true"],
     "train-rm does not use sequence parallelism"),
    ("sft", ["data.path=DATA", "data.max_length=1000"],
     "data.max_length 1000 exceeds the policy's 128 positions: lower it"),
    ("sft", ["data.path=DATA", "rollout.n_samples=2"], "rollout"),
])
def test_config_errors_come_first(verb, overrides, needle, tmp_path, nothing_built):
    from remax_megatron.training.finetune_config import RMConfig, SFTConfig, load_finetune_config
    from remax_megatron.training.reward_training import RewardModelRun
    from remax_megatron.training.sft import SFTRun

    data = write_rows(tmp_path / "d.jsonl", sft_rows(8))
    overrides = [o.replace("DATA", data) for o in overrides]
    with pytest.raises(ConfigError) as err:
        cfg = load_finetune_config(SFTConfig if verb == "sft" else RMConfig, None, [
            f"policy.load={tiny_policy(tmp_path)}", *overrides])
        (SFTRun if verb == "sft" else RewardModelRun)(cfg)
    assert needle in str(err.value)
