"""Tensor-parallel shard rules (pure functions), checked on hand-built tensors."""

import torch

from remax_megatron.models.sharding import global_name, initial_kind, pad_vocab, shard, unshard


def test_plain_chunking_by_rank():
    full = torch.arange(8).reshape(4, 2)
    assert shard(full, 1, 2, dim=0).tolist() == [[4, 5], [6, 7]]
    assert shard(full, 0, 2, dim=1).tolist() == [[0], [2], [4], [6]]


def test_swiglu_stride_two():
    # fc1 = [gate rows g0..g3 ; up rows u0..u3]; rank r holds cat(gate chunk r, up chunk r).
    full = torch.tensor([10, 11, 12, 13, 20, 21, 22, 23]).unsqueeze(1)
    assert shard(full, 0, 2, dim=0, stride=2).squeeze(1).tolist() == [10, 11, 20, 21]
    assert shard(full, 1, 2, dim=0, stride=2).squeeze(1).tolist() == [12, 13, 22, 23]


def test_unshard_inverts_shard():
    full = torch.randn(12, 6)
    for size in (1, 2, 3):
        for dim, stride in ((0, 1), (1, 1), (0, 2)):
            parts = [shard(full, r, size, dim, stride) for r in range(size)]
            assert torch.equal(unshard(parts, dim, stride), full)


def test_global_layer_names_and_vocab_padding():
    assert global_name("decoder.layers.1.mlp.linear_fc1.weight", 4) == \
        "decoder.layers.5.mlp.linear_fc1.weight"
    assert global_name("embedding.word_embeddings.weight", 4) == "embedding.word_embeddings.weight"
    w = torch.ones(3, 2)
    assert pad_vocab(w, 5)[3:].abs().sum() == 0 and pad_vocab(w, 5).shape == (5, 2)
    assert pad_vocab(torch.arange(6).reshape(6, 1), 4).shape == (4, 1)


def test_initial_kind_of_local_and_transformer_engine_names():
    cases = {
        "decoder.layers.0.self_attention.linear_qkv.bias": "zeros",
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias": "zeros",  # TE fused norm
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": "ones",
        "decoder.layers.0.input_layernorm.weight": "ones",
        "decoder.layers.0.input_layernorm.bias": "zeros",
        "decoder.final_layernorm.weight": "ones",
        "decoder.layers.0.mlp.linear_fc1.weight": "normal",
        "embedding.word_embeddings.weight": "normal",
    }
    assert {name: initial_kind(name) for name in cases} == cases
