"""Exact model-state bytes against hand counts: fp32 Adam holds 4 bytes of weights, 4 of gradient
and 8 of moments per parameter (16 in all, the paper's "in principle" figure); a frozen model
only its weights."""

import torch

from remax_megatron.models.builder import build_policy
from remax_megatron.models.config import ModelConfig
from remax_megatron.training.engine import OptimizerSettings, build_optimizer, update, wrap_ddp
from remax_megatron.training.memory import format_states, human, model_state_bytes

CONFIG = ModelConfig.llama(num_layers=2, hidden_size=64, num_attention_heads=4,
                           num_key_value_heads=2, ffn_hidden_size=96, vocab_size=128,
                           max_position_embeddings=32)


def test_fp32_adam_is_sixteen_bytes_per_parameter(megatron_runtime):
    model = build_policy(CONFIG)
    count = sum(p.numel() for p in model.parameters())
    assert model_state_bytes(model) == {"params": 4 * count, "grads": 0, "optimizer": 0,
                                        "total": 4 * count}
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, OptimizerSettings(lr=1e-3))
    ids = torch.randint(0, 128, (2, 8))
    batch = {"input_ids": ids, "position_ids": torch.arange(8).expand(2, 8)}

    def loss(output, batch):
        return output.float().pow(2).mean() * 2, torch.tensor(2, dtype=torch.int), {}

    applied, _ = update(ddp, optimizer, [batch], loss, seq_length=8, micro_batch_size=2)
    assert applied
    states = model_state_bytes(model, ddp, optimizer)
    # the grad buffer may be padded for alignment: at least 4 bytes per parameter
    assert states["params"] == 4 * count and states["optimizer"] == 8 * count
    assert 4 * count <= states["grads"] < 4 * count + 4096
    assert "policy" in format_states({"policy": states})
    assert (human(512), human(3 * 2 ** 20), human(1.5 * 2 ** 30)) == ("512 B", "3.00 MiB",
                                                                       "1.50 GiB")
