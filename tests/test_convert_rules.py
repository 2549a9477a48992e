"""The weight mapping as pure functions: megatron's grouped QKV on a hand-built example, and
every family's rule table inverting exactly (to_hf after to_mcore is the identity)."""

import pytest
import torch

from remax_megatron.convert import gpt2, llama, rules
from remax_megatron.convert.qkv import fuse_qkv, split_qkv
from remax_megatron.models.config import ModelConfig


def test_grouped_qkv_layout_by_hand():
    # 4 query heads in 2 groups, head_dim 1: rows are labelled by value.
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = fuse_qkv(q, k, v, num_heads=4, num_groups=2, head_dim=1)
    assert fused.squeeze(1).tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    back = split_qkv(fused, 4, 2, 1)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_mha_qkv_per_head_with_head_dim_two():
    q, k, v = (torch.arange(4.0) + base for base in (0, 10, 20))  # biases, 2 heads of dim 2
    fused = fuse_qkv(q, k, v, num_heads=2, num_groups=2, head_dim=2)
    assert fused.tolist() == [0, 1, 10, 11, 20, 21, 2, 3, 12, 13, 22, 23]


CONFIGS = {
    "gpt2": (gpt2, ModelConfig.gpt2(num_layers=2, hidden_size=8, num_attention_heads=2,
                                    vocab_size=11, max_position_embeddings=6)),
    "llama_gqa_qkv_bias": (llama, ModelConfig.llama(
        num_layers=2, hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
        ffn_hidden_size=12, vocab_size=11, max_position_embeddings=6, add_qkv_bias=True)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("reward", [False, True])
def test_rules_invert_exactly(name, reward):
    family, config = CONFIGS[name]
    shapes = rules.planned_shapes(family, config, reward)
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    table = family.rules(config, reward)
    mcore = dict(rules.to_mcore(table, hf.__getitem__))
    back = dict(rules.to_hf(table, mcore.__getitem__))
    assert list(back) == list(shapes)  # the write order is the planned order
    assert all(torch.equal(back[n], hf[n]) for n in hf)
    assert ("score_head.weight" in mcore) == reward
