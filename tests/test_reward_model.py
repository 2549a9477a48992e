"""A reward model on its own process groups: scores equal transformers' sequence-classifier
scores at layouts different from the policy's (tp, pp and dp all differing), with the policy's
tokenizer and with a different one (re-tokenized text); and rule rewards."""

from __future__ import annotations

import pytest
import torch

from conftest import WORKERS, read_json, run_torchrun
from remax_megatron import tiny
from remax_megatron.config_io import ConfigError
from remax_megatron.convert.commands import hf_to_mcore
from remax_megatron.reward import Scored
from remax_megatron.reward.rule import RuleReward

WORKER = str(WORKERS / "reward_check.py")
TEXTS = [("tell me about", " the lazy dog ."), ("hello", " world"), ("a", " b c d e f g"),
         ("red green", " blue yellow black white"), ("the quick brown fox", " jumps"),
         ("cats", " and dogs play in the garden")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    policy_tok = tiny.build_tokenizer(300)
    policy_tok.save_pretrained(root / "policy_tok")
    other_tok = tiny.build_tokenizer(280, corpus="a different corpus : " + "lorem ipsum " * 30)
    cases = {}
    for name, (arch, tok) in {"gpt2_same_tokenizer": ("GPT2ForSequenceClassification", policy_tok),
                              "llama_other_tokenizer": ("LlamaForSequenceClassification",
                                                        other_tok)}.items():
        model = tiny.build_hf_model(arch, len(tok), seed=3)
        ckpt = hf_to_mcore(tiny.save_hf(model, tok, root / f"{name}_hf"), root / name)
        expected = []
        for prompt, response in TEXTS:
            ids = tok(prompt + response).input_ids
            with torch.no_grad():
                expected.append(model(torch.tensor([ids])).logits[0, 0].item())
        cases[name] = {"checkpoint": str(ckpt), "texts": TEXTS, "expected": expected}
    path = root / "ref.pt"
    torch.save({"policy_tokenizer": str(root / "policy_tok"), "cases": cases}, path)
    return path


LAYOUTS = {
    "policy_dp2_rm_tp2": ["--rm-tp", "2"],
    "policy_tp2_rm_dp2": ["--tp", "2"],
    "policy_tp2_rm_pp2": ["--tp", "2", "--rm-pp", "2"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reward_model_on_its_own_groups(layout, reference, tmp_path):
    run_torchrun(2, [WORKER, "--ref", str(reference), "--report", str(tmp_path / "r.json"),
                     *LAYOUTS[layout]])
    report = read_json(tmp_path / "r.json")
    assert report["gpt2_same_tokenizer/retokenized"] is False
    assert report["llama_other_tokenizer/retokenized"] is True
    for key, value in report.items():
        if key.endswith("max_err"):
            assert value < 1e-4, f"{layout}: {key} = {value}"


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def test_rule_reward_and_its_errors():
    items = [Scored(0, "p", "abc", [1], [2], False), Scored(1, "p", "de", [1], [3], True)]
    assert RuleReward("test_reward_model:length_reward").score(items).tolist() == [3.0, 2.0]
    with pytest.raises(ConfigError, match="must look like module.path:function_name"):
        RuleReward("no_colon")
    with pytest.raises(ConfigError, match="has no function nope"):
        RuleReward("test_reward_model:nope")
    with pytest.raises(ConfigError, match="returned 1 rewards for 2 responses"):
        RuleReward("test_reward_model:one_value").score(items)


def one_value(prompts, responses):
    return [0.0]
