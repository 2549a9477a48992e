"""HF <-> Megatron conversion, transformers as the oracle: for every architecture, the Megatron
model loaded at tp1/pp1, tp2, pp2 and tp2 x pp2 gives transformers' logits (or reward scores)
within 1e-4 on a padded batch; hf -> mcore -> hf is bit-identical and loads with from_pretrained;
a checkpoint re-saved at tp2 x pp2 (as training writes them) exports bit-identically too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import WORKERS, read_json, run_python, run_torchrun
from remax_megatron import tiny
from remax_megatron.convert.commands import hf_to_mcore, mcore_to_hf
from remax_megatron.ops import padding

WORKER = str(WORKERS / "convert_equivalence.py")
TOL = 1e-4
VOCAB = 300  # pads to 384 at tp1 and 512 at tp2
CASES = {
    "gpt2": ("GPT2LMHeadModel", {}),
    "llama_gqa": ("LlamaForCausalLM", {}),
    "llama_tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3_rope_scaling": ("LlamaForCausalLM", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),  # scales at 12 tokens
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", {}),  # q/k norms, head_dim 24 (not hidden / heads)
    "qwen3_tied_reward": ("Qwen3ForSequenceClassification", {"tie_word_embeddings": True}),
    "gpt2_reward": ("GPT2ForSequenceClassification", {}),
    "llama_reward": ("LlamaForSequenceClassification", {}),
}


def padded_batch(vocab: int):
    """Rows: full, left-padded (a short prompt), right-padded, and padded on both sides."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, 9:] = 0
    mask[3, :2] = 0
    mask[3, 10:] = 0
    ids[mask == 0] = 0  # the pad id
    return ids, mask


def hf_outputs(model, ids, mask):
    pos = padding.position_ids(mask)
    with torch.no_grad():
        if hasattr(model, "score"):
            base = model.transformer if hasattr(model, "transformer") else model.model
            hidden = base(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            return model.score(hidden).squeeze(-1)
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    tokenizer = tiny.build_tokenizer(VOCAB)
    ids, mask = padded_batch(len(tokenizer))
    cases = {}
    for i, (name, (arch, overrides)) in enumerate(CASES.items()):
        model = tiny.build_hf_model(arch, len(tokenizer), seed=i, **overrides)
        hf_dir = tiny.save_hf(model, tokenizer, root / f"{name}_hf")
        ckpt = hf_to_mcore(hf_dir, root / f"{name}_mcore")
        cases[name] = {"checkpoint": str(ckpt), "hf_dir": str(hf_dir),
                       "expected": hf_outputs(model, ids, mask)}
    ref_path = root / "reference.pt"
    torch.save({"cases": cases, "input_ids": ids, "mask": mask}, ref_path)
    return {"root": root, "ref": ref_path, "cases": cases, "ids": ids, "mask": mask}


def test_vocab_needs_padding(converted):
    assert VOCAB >= len(tiny.build_tokenizer(VOCAB)) > 128 and len(tiny.build_tokenizer(VOCAB)) % 128


def layout_report(ref, out: Path, nproc: int = 1, flags: tuple = ()) -> dict:
    """The worker's largest |Megatron - transformers| per case, the checkpoints loaded at the
    layout ``flags`` give (``--resave DIR`` also re-saves them there)."""
    args = [WORKER, "--ref", str(ref), "--report", str(out / "r.json"), *flags]
    run_python(args) if nproc == 1 else run_torchrun(nproc, args)
    return read_json(out / "r.json")


def check_report(report, cases=CASES):
    assert set(report) == set(cases)
    bad = {k: v for k, v in report.items() if not v <= TOL}
    assert not bad, f"Megatron differs from transformers: {bad}"


def test_single_rank_matches_transformers(converted, tmp_path):
    check_report(layout_report(converted["ref"], tmp_path))


LAYOUTS = {"tp2": (2, ["--tp", "2"]), "pp2": (2, ["--pp", "2"])}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_match_transformers(layout, converted, tmp_path):
    check_report(layout_report(converted["ref"], tmp_path, *LAYOUTS[layout]))


@pytest.fixture(scope="module")
def resaved_tp2_pp2(converted, tmp_path_factory):
    """tp2 x pp2 run of the comparison that also re-saves every model at that layout."""
    out = tmp_path_factory.mktemp("tp2pp2")
    report = layout_report(converted["ref"], out, 4,
                           ["--tp", "2", "--pp", "2", "--resave", str(out / "resaved")])
    return out, report


@pytest.mark.distributed
def test_tp2_pp2_matches_transformers(resaved_tp2_pp2):
    check_report(resaved_tp2_pp2[1])


def _assert_bit_identical(original_dir, exported_dir):
    original = load_file(str(original_dir / "model.safetensors"))
    exported = load_file(str(exported_dir / "model.safetensors"))
    if transformers.AutoConfig.from_pretrained(original_dir).tie_word_embeddings:
        original.pop("lm_head.weight", None)  # a tied head need not be stored
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_identical_and_loads(name, converted, tmp_path):
    case = converted["cases"][name]
    out = mcore_to_hf(case["checkpoint"], tmp_path / "hf")
    _assert_bit_identical(Path(case["hf_dir"]), out)
    arch = CASES[name][0]
    model = getattr(transformers, arch).from_pretrained(out).eval()
    got = hf_outputs(model, converted["ids"], converted["mask"])
    real = converted["mask"].bool()
    assert torch.equal(got[real], case["expected"][real])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello world").input_ids


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "llama_reward"])
def test_checkpoint_saved_at_tp2_pp2_exports_bit_identically(name, converted, resaved_tp2_pp2,
                                                              tmp_path):
    out = mcore_to_hf(resaved_tp2_pp2[0] / "resaved" / name, tmp_path / "hf")
    _assert_bit_identical(Path(converted["cases"][name]["hf_dir"]), out)
