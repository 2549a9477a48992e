"""The rollout engine against transformers and against itself, at tp1, tp2 and pp2: greedy
tokens equal transformers' generate(do_sample=False) on the converted weights (prompts of different
lengths, EOS reached mid-batch), cached decoding equals uncached recomputation, top-k 1 is greedy,
seeded sampling is reproducible and layout-independent, and the shared-prefill ReMax pair gives
exactly the tokens of two separate generations."""

from __future__ import annotations

import pytest
import torch

from conftest import WORKERS, read_json, run_python, run_torchrun
from remax_megatron import tiny
from remax_megatron.convert.commands import hf_to_mcore
from remax_megatron.rollout.generate_command import left_pad

WORKER = str(WORKERS / "generation_check.py")
MAX_NEW = 10
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog .", "a", "red green blue"]
CASES = {"llama_gqa": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "qwen3": "Qwen3ForCausalLM"}
LOGPROB_TOL = 1e-4


def right_pad(sequences, pad_id):
    ids, mask = left_pad(sequences, pad_id)
    for row in range(len(sequences)):
        ids[row] = torch.cat([ids[row][mask[row].bool()], ids[row][~mask[row].bool()]])
        mask[row] = torch.sort(mask[row], descending=True).values
    return ids, mask


def hf_greedy(model, ids, mask, eos):
    """transformers' greedy tokens, zeroed after each row's EOS (as our response_mask does)."""
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                         eos_token_id=eos, pad_token_id=0)[:, ids.size(1):].tolist()
    tokens, finish = [], []
    for row in out:
        end = row.index(eos) + 1 if eos in row else len(row)
        tokens.append(row[:end] + [0] * (len(row) - end))
        finish.append("eos" if eos in row else "length")
    return tokens, finish


def pick_eos(model, ids, mask):
    """A token that greedy decoding produces early in some rows but never in another, so EOS
    is reached mid-batch."""
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                         pad_token_id=0)[:, ids.size(1):].tolist()
    for token in sorted({t for row in out for t in row[1:MAX_NEW - 3]}):
        hits = [token in row for row in out]
        if any(hits) and not all(hits):
            return token
    raise AssertionError("no token makes EOS land mid-batch")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    tokenizer = tiny.build_tokenizer(300)
    encoded = [tokenizer(p).input_ids for p in PROMPTS]
    ids, mask = left_pad(encoded, 0)
    right_ids, right_mask = right_pad(encoded, 0)
    ref = {}
    for seed, (name, arch) in enumerate(CASES.items()):
        model = tiny.build_hf_model(arch, len(tokenizer), seed=seed)
        ckpt = hf_to_mcore(tiny.save_hf(model, tokenizer, root / f"{name}_hf"), root / name)
        eos = pick_eos(model, ids, mask)
        tokens, finish = hf_greedy(model, ids, mask, eos)
        ref[name] = {"checkpoint": str(ckpt), "prompt_ids": ids, "prompt_mask": mask,
                     "right_ids": right_ids, "right_mask": right_mask, "eos": eos,
                     "max_new_tokens": MAX_NEW, "hf_finish": finish,
                     "hf_tokens": tokens}
    path = root / "reference.pt"
    torch.save(ref, path)
    return path


def test_eos_lands_mid_batch(reference):
    for case in torch.load(reference, weights_only=False).values():
        assert set(case["hf_finish"]) == {"eos", "length"}


@pytest.fixture(scope="module")
def tp1_report(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1")
    run_python([WORKER, "--ref", str(reference), "--report", str(out / "r.json"),
                "--save-sampled", str(out / "sampled.pt")])
    return out


def _check(report, expect_layout_check):
    for name in CASES:
        for check in ("greedy_matches_transformers", "finish_reasons", "right_padded_same_tokens",
                      "top_k1_is_greedy", "sampled_reproducible", "no_padded_vocab",
                      "pair_greedy_equals_separate", "pair_sampled_equals_separate",
                      "pair_rows_differ", "cached_vs_uncached_greedy_argmax",
                      "cached_vs_uncached_pair_argmax", "pipeline_groups_same_tokens"):
            assert report[f"{name}/{check}"] is True, f"{name}: {check} failed"
        for label in ("greedy", "pair"):
            err = report[f"{name}/cached_vs_uncached_{label}_max_logprob_err"]
            assert err < LOGPROB_TOL, f"{name}: cached log-probs differ by {err}"
        err = report[f"{name}/pipeline_groups_logprob_err"]
        assert err < LOGPROB_TOL, f"{name}: pipelined prompt groups change log-probs by {err}"
        if expect_layout_check:
            assert report[f"{name}/sampled_same_as_tp1"] is True, name


def test_single_rank(tp1_report):
    _check(read_json(tp1_report / "r.json"), expect_layout_check=False)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parallel_layouts(layout, reference, tp1_report, tmp_path):
    flag = ["--tp", "2"] if layout == "tp2" else ["--pp", "2"]
    run_torchrun(2, [WORKER, "--ref", str(reference), "--report", str(tmp_path / "r.json"),
                     "--sampled", str(tp1_report / "sampled.pt"), *flag])
    _check(read_json(tmp_path / "r.json"), expect_layout_check=True)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_wide_decode_steps_equal_transformers(arch, megatron_runtime, tmp_path):
    """Batches wide enough for the CPU decode step's transposed products (W @ x^T) give
    transformers' greedy tokens and log-probs (the layout tests above use fewer rows)."""
    from remax_megatron.models.checkpoint import load_model
    from remax_megatron.rollout.engine import generate
    from remax_megatron.rollout.forward import StageForward

    tokenizer = tiny.build_tokenizer(300)
    hf = tiny.build_hf_model(arch, len(tokenizer), seed=5)
    model, _ = load_model(hf_to_mcore(tiny.save_hf(hf, tokenizer, tmp_path / "hf"),
                                      tmp_path / "ckpt"))
    rows, prompt, new = 12, 6, 12
    if StageForward(model).column_rows is not None:
        assert StageForward(model).use_columns(1, rows)  # the path under test
    ids = torch.randint(3, len(tokenizer), (rows, prompt), generator=torch.Generator().manual_seed(0))
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=new)
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=new, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.tokens, want[:, prompt:])
    with torch.no_grad():
        logp = torch.log_softmax(hf(want).logits[:, prompt - 1:-1].float(), -1)
    torch.testing.assert_close(out.log_probs, logp.gather(-1, want[:, prompt:, None]).squeeze(-1),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_static_decode_steps_equal_the_eager_ones(arch, megatron_runtime, tmp_path, monkeypatch):
    """The decode step a GPU captures as a CUDA graph (static buffers, the step a device tensor,
    attention over the whole masked cache), run uncaptured on the CPU: transformers' greedy
    tokens, and the eager steps' tokens and log-probs with padded prompts, a greedy and a
    sampled continuation per prompt and rows ending at EOS mid-batch."""
    from remax_megatron.models.checkpoint import load_model
    from remax_megatron.rollout import engine, static_decode
    from remax_megatron.rollout.sampling import GREEDY, SamplingParams

    tokenizer = tiny.build_tokenizer(300)
    hf = tiny.build_hf_model(arch, len(tokenizer), seed=7)
    model, _ = load_model(hf_to_mcore(tiny.save_hf(hf, tokenizer, tmp_path / "hf"),
                                      tmp_path / "ckpt"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tokenizer), (6, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[4, :5] = 0
    pair = [GREEDY, SamplingParams(temperature=1.0, top_p=0.9)]
    eager = engine.generate(model, ids, mask, continuations=pair, max_new_tokens=12,
                            eos_token_ids=[5, 9, 11], seed=3)
    steps = []
    real_step = static_decode.StaticDecode._step
    monkeypatch.setattr(static_decode.StaticDecode, "_step",
                        lambda self: steps.append(1) or real_step(self))
    monkeypatch.setattr(engine, "STATIC_DECODE_DEVICES", {"cpu"})
    static = engine.generate(model, ids, mask, continuations=pair, max_new_tokens=12,
                             eos_token_ids=[5, 9, 11], seed=3)
    assert len(steps) == static.tokens.size(1) - 1  # every decode step took the static path
    assert eager.finish_reason.count("eos") >= 1 and eager.finish_reason.count("length") >= 1
    assert torch.equal(static.tokens, eager.tokens)
    assert torch.equal(static.lengths, eager.lengths)
    torch.testing.assert_close(static.log_probs, eager.log_probs, rtol=0, atol=1e-5)

    plain = ids[:, :5]
    out = engine.generate(model, plain, torch.ones_like(plain), max_new_tokens=10)
    want = hf.generate(plain, attention_mask=torch.ones_like(plain), do_sample=False,
                       max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.tokens, want[:, 5:])


@pytest.mark.parametrize("tempered", [True, False])
def test_recorded_log_probs_follow_the_sampling_temperature(tempered, megatron_runtime, tmp_path):
    """With tempered_log_probs a sampled row records log softmax(logits / T) of its tokens (the
    distribution it was drawn from, what the trainer trains), without it log softmax(logits);
    the greedy row always the latter. transformers' logits on the generated tokens are the
    reference."""
    from remax_megatron.models.checkpoint import load_model
    from remax_megatron.rollout.engine import generate
    from remax_megatron.rollout.sampling import GREEDY, SamplingParams

    tokenizer = tiny.build_tokenizer(300)
    hf = tiny.build_hf_model("LlamaForCausalLM", len(tokenizer), seed=6)
    model, _ = load_model(hf_to_mcore(tiny.save_hf(hf, tokenizer, tmp_path / "hf"),
                                      tmp_path / "ckpt"))
    prompt, new, temperature = 5, 8, 0.6
    ids = torch.randint(3, len(tokenizer), (3, prompt), generator=torch.Generator().manual_seed(2))
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=new, seed=4,
                   continuations=[GREEDY, SamplingParams(temperature=temperature, top_p=1.0)],
                   tempered_log_probs=tempered)
    full = torch.cat([ids.repeat_interleave(2, dim=0), out.tokens], dim=1)
    with torch.no_grad():
        logits = hf(full).logits[:, prompt - 1:-1].float()
    scale = torch.tensor([1.0, temperature if tempered else 1.0]).repeat(3)[:, None, None]
    want = torch.log_softmax(logits / scale, -1).gather(-1, out.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out.log_probs, want, rtol=0, atol=1e-5)
