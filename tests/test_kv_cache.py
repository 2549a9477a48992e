"""The shared-prefix KV cache: prompt groups (pipelined rollout) give the whole batch's results,
decode equals attention recomputed over the full sequence, and generate() frees its cache."""

import gc
import math
import weakref

import pytest
import torch

from remax_megatron.rollout import engine
from remax_megatron.rollout.kv_cache import SharedPrefixKVCache

B, K, P, HEADS, GROUPS, D, STEPS = 5, 2, 6, 4, 2, 8, 3


def random_inputs(seed=0, k=K, padded=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, P, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # left padding
        mask[3, 4:] = 0  # right padding
    prompt = [torch.randn(P, B, n, D, generator=g) for n in (HEADS, GROUPS, GROUPS)]
    decode = [[torch.randn(1, B * k, n, D, generator=g) for n in (HEADS, GROUPS, GROUPS)]
              for _ in range(STEPS)]
    return mask, prompt, decode


def new_cache(mask, k=K):
    return SharedPrefixKVCache(1, mask, k, STEPS, groups=GROUPS, head_dim=D, dtype=torch.float32)


def run(cache, prompt, decode, groups, per_prompt=K):
    """Prefill and decode, each over the given prompt groups; outputs in row order."""
    q, k, v = prompt
    prefill = torch.cat([cache.prefill(0, q[:, g], k[:, g], v[:, g], g) for g in groups], dim=1)
    steps = []
    for step, (q, k, v) in enumerate(decode):
        rows = [slice(g.start * per_prompt, g.stop * per_prompt) for g in groups]
        steps.append(torch.cat([cache.decode(0, step, q[:, r], k[:, r], v[:, r], g)
                                for g, r in zip(groups, rows)], dim=1))
    return prefill, steps


@pytest.mark.parametrize("k", [1, K])
def test_prompt_groups_equal_the_whole_batch(k):
    mask, prompt, decode = random_inputs(k=k)
    whole = run(new_cache(mask, k), prompt, decode, [slice(0, B)], k)
    grouped = run(new_cache(mask, k), prompt, decode, [slice(0, 2), slice(2, 3), slice(3, 5)], k)
    torch.testing.assert_close(grouped[0], whole[0], rtol=0, atol=1e-6)
    for a, b in zip(grouped[1], whole[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,padded", [(K, True), (1, True), (1, False)])
def test_decode_equals_attention_over_the_full_sequence(k, padded):
    """Row r at decode step t: softmax over its prompt's real keys and its own generated keys
    (k continuations per prompt; a single one, and unpadded prompts: no mask at all)."""
    mask, prompt, decode = random_inputs(1, k, padded)
    _, steps = run(new_cache(mask, k), prompt, decode, [slice(0, B)], k)
    _, pk, pv = prompt
    rep = HEADS // GROUPS
    for t in range(STEPS):
        for r in range(B * k):
            b = r // k
            real = mask[b].bool()
            keys = torch.cat([pk[real, b]] + [decode[s][1][0, r][None] for s in range(t + 1)])
            values = torch.cat([pv[real, b]] + [decode[s][2][0, r][None] for s in range(t + 1)])
            q = decode[t][0][0, r]  # [heads, d]
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
            probs = torch.softmax(torch.einsum("hd,nhd->hn", q, keys) / math.sqrt(D), dim=-1)
            want = torch.einsum("hn,nhd->hd", probs, values).reshape(-1)
            torch.testing.assert_close(steps[t][0, r], want, rtol=0, atol=1e-5)


def test_generate_frees_its_cache(megatron_runtime, monkeypatch):
    from remax_megatron.models.builder import build_policy
    from remax_megatron.models.config import ModelConfig

    made = []

    class Recorded(SharedPrefixKVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(engine, "SharedPrefixKVCache", Recorded)
    model = build_policy(ModelConfig.llama(num_layers=2, hidden_size=32, num_attention_heads=4,
                                           ffn_hidden_size=64, vocab_size=64,
                                           max_position_embeddings=32))
    ids = torch.randint(0, 64, (2, 5))
    out = engine.generate(model, ids, torch.ones_like(ids), max_new_tokens=4)
    assert out.tokens.shape == (2, 4)
    gc.collect()
    assert len(made) == 1 and made[0]() is None


def test_finished_rows_checked_every_few_steps_give_the_same_output(megatron_runtime, monkeypatch):
    """generate() checks that every row has finished only every few steps on a GPU (a host sync
    per check): rows that finished meanwhile produce padding and the output is cut at the longest
    row, exactly as when checking after every step."""
    from remax_megatron.models.builder import build_policy
    from remax_megatron.models.config import ModelConfig

    torch.manual_seed(0)
    model = build_policy(ModelConfig.gpt2(num_layers=2, hidden_size=32, num_attention_heads=4,
                                          vocab_size=64, max_position_embeddings=64))
    ids = torch.randint(0, 64, (4, 5))
    free = engine.generate(model, ids, torch.ones_like(ids), max_new_tokens=12)
    # row r produces one of these by step r + 2: every row stops early, at different steps
    eos = sorted({int(free.tokens[r, r + 2]) for r in range(4)})
    outputs = []
    for every in (1, 3, 100):
        monkeypatch.setitem(engine.FINISHED_CHECK_EVERY, "cpu", every)
        outputs.append(engine.generate(model, ids, torch.ones_like(ids), max_new_tokens=12,
                                       eos_token_ids=eos))
    first = outputs[0]
    assert first.finish_reason == ["eos"] * 4 and first.tokens.size(1) < 12
    assert len(set(first.lengths.tolist())) > 1
    for out in outputs[1:]:
        assert torch.equal(out.tokens, first.tokens)
        assert torch.equal(out.log_probs, first.log_probs)
        assert torch.equal(out.lengths, first.lengths)
        assert torch.equal(out.response_mask, first.response_mask)
        assert out.finish_reason == first.finish_reason
