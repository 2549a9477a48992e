"""The shared-prefix KV cache: prompt groups (pipelined rollout) give the whole batch's results,
decode equals attention recomputed over the full sequence, and generate() frees its cache."""

import gc
import math
import weakref

import torch

from remax_megatron.rollout import engine
from remax_megatron.rollout.kv_cache import SharedPrefixKVCache

B, K, P, HEADS, GROUPS, D, STEPS = 5, 2, 6, 4, 2, 8, 3


def random_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[3, 4:] = 0  # right padding
    prompt = [torch.randn(P, B, n, D, generator=g) for n in (HEADS, GROUPS, GROUPS)]
    decode = [[torch.randn(1, B * K, n, D, generator=g) for n in (HEADS, GROUPS, GROUPS)]
              for _ in range(STEPS)]
    return mask, prompt, decode


def new_cache(mask):
    return SharedPrefixKVCache(1, mask, K, STEPS, groups=GROUPS, head_dim=D, dtype=torch.float32)


def run(cache, prompt, decode, groups):
    """Prefill and decode, each over the given prompt groups; outputs in row order."""
    q, k, v = prompt
    prefill = torch.cat([cache.prefill(0, q[:, g], k[:, g], v[:, g], g) for g in groups], dim=1)
    steps = []
    for step, (q, k, v) in enumerate(decode):
        rows = [slice(g.start * K, g.stop * K) for g in groups]
        steps.append(torch.cat([cache.decode(0, step, q[:, r], k[:, r], v[:, r], g)
                                for g, r in zip(groups, rows)], dim=1))
    return prefill, steps


def test_prompt_groups_equal_the_whole_batch():
    mask, prompt, decode = random_inputs()
    whole = run(new_cache(mask), prompt, decode, [slice(0, B)])
    grouped = run(new_cache(mask), prompt, decode, [slice(0, 2), slice(2, 3), slice(3, 5)])
    torch.testing.assert_close(grouped[0], whole[0], rtol=0, atol=1e-6)
    for a, b in zip(grouped[1], whole[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_decode_equals_attention_over_the_full_sequence():
    """Row r at decode step t: softmax over its prompt's real keys and its own generated keys."""
    mask, prompt, decode = random_inputs(1)
    _, steps = run(new_cache(mask), prompt, decode, [slice(0, B)])
    _, pk, pv = prompt
    rep = HEADS // GROUPS
    for t in range(STEPS):
        for r in range(B * K):
            b = r // K
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
