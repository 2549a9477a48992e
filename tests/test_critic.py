"""PPO's critic on one rank: started from a reward-model checkpoint it values every response
position as transformers' sequence classifier scores it there; started from the policy it holds
the policy's backbone and values everything 0; its clipped value loss on a first update equals the
plain squared error against transformers' values; wrong starting checkpoints are one-line errors."""

from __future__ import annotations

import pytest
import torch

from remax_megatron import tiny
from remax_megatron.config_io import ConfigError
from remax_megatron.convert.commands import hf_to_mcore
from remax_megatron.models.builder import build_policy
from remax_megatron.models.checkpoint import CheckpointMeta, read_checkpoint
from remax_megatron.models.config import ModelConfig
from remax_megatron.training.critic import Critic, describe_critic
from remax_megatron.training.engine import OptimizerSettings


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic")
    tok = tiny.build_tokenizer(300)
    rm = tiny.build_hf_model("LlamaForSequenceClassification", len(tok), seed=4)
    policy = tiny.build_hf_model("LlamaForCausalLM", len(tok), seed=5)
    return {"tokenizer": tok, "rm": rm,
            "rm_ckpt": hf_to_mcore(tiny.save_hf(rm, tok, root / "rm_hf"), root / "rm"),
            "policy_ckpt": hf_to_mcore(tiny.save_hf(policy, tok, root / "p_hf"), root / "p")}


def make_critic(source, policy=None):
    return Critic(source, policy, lambda m: m, OptimizerSettings(lr=1e-3), warmup_steps=0,
                  total_steps=1, clip_value=0.2)


def batch_of(ids: torch.Tensor) -> dict:
    b, s = ids.shape
    mask = torch.zeros(b, s - 1)
    mask[:, 2:] = 1  # the "response": everything after the first three tokens
    return {"input_ids": ids, "position_ids": torch.arange(s).expand(b, s), "loss_mask": mask}


def test_critic_from_a_reward_model_values_each_position_like_transformers(megatron_runtime,
                                                                           checkpoints):
    policy = read_checkpoint(checkpoints["policy_ckpt"])
    source = describe_critic(None, str(checkpoints["rm_ckpt"]), policy.config, policy.meta,
                             policy.meta.vocab_size)
    critic = make_critic(source)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    batch = batch_of(ids)
    critic.values([batch], 9, 2)
    rm = checkpoints["rm"]
    with torch.no_grad():
        want = rm.score(rm.model(ids).last_hidden_state)[..., 0][:, :-1] * batch["loss_mask"]
    torch.testing.assert_close(batch["values"], want, atol=1e-4, rtol=1e-4)

    # first update: V == V_old, so the clipped loss is 0.5 * mean (V - R)^2 over response tokens
    batch["returns"] = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    batch["returns"] *= batch["loss_mask"]
    applied, norm = critic.update([batch], 9, 2)
    assert applied and norm > 0
    loss, normalizer, clipped, tokens = critic.stats.tolist()
    plain = 0.5 * (((want - batch["returns"]) ** 2) * batch["loss_mask"]).sum() / 12
    assert loss / normalizer == pytest.approx(plain.item(), rel=1e-4)
    assert (normalizer, clipped, tokens) == (12, 0, 12)


def test_critic_from_the_policy_copies_its_backbone_with_a_zero_head(megatron_runtime,
                                                                    checkpoints):
    config = ModelConfig.llama(num_layers=2, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, ffn_hidden_size=96, vocab_size=300,
                               max_position_embeddings=64)
    policy = build_policy(config)
    meta = CheckpointMeta(kind="policy", architecture="LlamaForCausalLM", model_type="llama",
                          dtype="fp32", vocab_size=300)
    source = describe_critic("policy", str(checkpoints["rm_ckpt"]), config, meta, 300)
    assert source.path is None and source.meta.architecture == "LlamaForSequenceClassification"
    critic = make_critic(source, policy)
    mine = dict(critic.model[0].named_parameters())  # the critic's one chunk
    for name, param in policy.named_parameters():
        if not name.startswith("output_layer"):
            assert torch.equal(mine[name], param), name
    assert mine["score_head.weight"].abs().sum() == 0
    batch = batch_of(torch.randint(3, 300, (2, 7)))
    critic.values([batch], 7, 2)
    assert batch["values"].abs().sum() == 0


def test_bad_critic_starts_are_one_line_errors(checkpoints):
    policy = read_checkpoint(checkpoints["policy_ckpt"])
    with pytest.raises(ConfigError, match="is a policy checkpoint; the critic starts from a "
                                          "reward-kind one: use critic.load=policy"):
        describe_critic(str(checkpoints["policy_ckpt"]), None, policy.config, policy.meta, 300)
    with pytest.raises(ConfigError, match=r"reward.load \(the critic's default start\)=.* has a "
                                          "vocabulary of 300 ids, the policy 320"):
        describe_critic(None, str(checkpoints["rm_ckpt"]), policy.config, policy.meta, 320)
