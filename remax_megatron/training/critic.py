"""PPO's value model: a GPT with a scalar head on the policy's tp/pp layout, with its own megatron
DDP, optimizer and LR schedule.

It starts from the reward model's checkpoint (DeepSpeed-Chat's choice, the default when the run
has one), from any reward-kind checkpoint, or from the policy's own weights with the scalar head at
zero. It must read the policy's tokens, so its vocabulary must be the policy's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..algorithms.common import clipped_value_loss, reduce
from ..config_io import ConfigError
from ..models.builder import build_chunks, model_chunks, unwrap
from ..models.checkpoint import CheckpointMeta, load_model, read_checkpoint
from ..models.hf_config import REWARD, HFModelInfo, to_hf_config
from .engine import OptimizerSettings, build_optimizer, build_scheduler, forward_only, update, wrap_ddp

log = logging.getLogger(__name__)

CRITIC_DIR = "critic"  # inside a training checkpoint: a reward-kind checkpoint of its own
STATS = ("value_loss", "value_normalizer", "value_clipped", "value_tokens")


@dataclass
class CriticSource:
    """Where the critic's first weights come from (decided before anything is built)."""

    path: str | None  # a reward-kind checkpoint, or None: the policy's weights
    config: object  # its ModelConfig
    meta: CheckpointMeta
    hf_config: dict


def describe_critic(load: str | None, reward_load: str | None, policy_config, policy_meta,
                    policy_vocab: int, policy_tokenizer=None) -> CriticSource:
    """Resolve ``critic.load`` (None: the reward model when there is one, else the policy) and
    check that it can read the policy's tokens."""
    path = reward_load if load is None else (None if load == "policy" else load)
    if path is None:
        if policy_config.is_moe:
            raise ConfigError("a critic from a mixture-of-experts policy is not supported: give "
                              "critic.load (or reward.load) a dense reward model, or use an "
                              "algorithm without a critic (remax, grpo, rloo, reinforce)")
        arch = {t: a for a, t in REWARD.items()}[policy_meta.model_type]
        meta = CheckpointMeta(kind="reward", architecture=arch, model_type=policy_meta.model_type,
                              dtype=policy_meta.dtype, vocab_size=policy_vocab,
                              source="critic initialized from the policy")
        info = HFModelInfo(policy_config, arch, policy_meta.model_type, True)
        return CriticSource(None, policy_config, meta, to_hf_config(info))
    ckpt = read_checkpoint(path)
    what = "critic.load" if load is not None else "reward.load (the critic's default start)"
    if not ckpt.meta.is_reward:
        raise ConfigError(f"{what}={path} is a {ckpt.meta.kind} checkpoint; the critic starts "
                          "from a reward-kind one: use critic.load=policy to start from the policy")
    if ckpt.meta.vocab_size != policy_vocab:
        raise ConfigError(
            f"{what}={path} has a vocabulary of {ckpt.meta.vocab_size} ids, the policy "
            f"{policy_vocab}: the critic reads the policy's tokens, so set critic.load=policy or a "
            "reward model with the policy's tokenizer")
    if policy_tokenizer is not None and ckpt.tokenizer_dir is not None:
        from ..data.tokenizer import load_tokenizer
        from ..reward.model import same_tokenizer

        if not same_tokenizer(load_tokenizer(ckpt), policy_tokenizer):
            raise ConfigError(f"{what}={path} has another tokenizer than the policy (same size, "
                              "different ids): the critic reads the policy's tokens, so set "
                              "critic.load=policy")
    return CriticSource(path, ckpt.config, ckpt.meta, ckpt.hf_config)


def check_critic_fits(source: CriticSource, world_size: int, tp: int, pp: int,
                      positions: int) -> None:
    """The critic runs on the policy's layout and reads prompt + response."""
    from ..runtime.layout import validate_layout

    validate_layout(world_size, tp, pp, source.config, "critic")
    limit = source.config.max_position_embeddings
    if positions > limit:
        raise ConfigError(f"the critic ({source.path or 'from the policy'}) has {limit} positions, "
                          f"fewer than data.max_prompt_length + rollout.max_new_tokens = "
                          f"{positions}: lower one, or start the critic elsewhere (critic.load)")


class Critic:
    def __init__(self, source: CriticSource, policy, precision, settings: OptimizerSettings,
                 warmup_steps: int, total_steps: int, clip_value: float,
                 load_weights: bool = True):
        """``policy``: the built policy or its virtual pipeline chunks (copied from when the
        source is the policy; the critic is chunked as it is); ``precision``: the trainer's
        dtype/device/Float16Module wrapper; ``load_weights`` False when a training checkpoint is
        about to replace the weights (resume). ``model`` and ``ddp`` are lists of chunks."""
        self.source = source
        self.clip_value = clip_value
        policy = model_chunks(policy) if policy is not None else None
        vpp = len(policy) if policy is not None else 1
        if source.path is not None and load_weights:
            chunks = model_chunks(load_model(source.path, expect_kind="reward",
                                             virtual_pp=vpp)[0])
        else:
            chunks = build_chunks(source.config, vpp, reward=True, perform_initialization=False)
            if load_weights:
                for mine, theirs in zip(chunks, policy, strict=True):
                    copy_backbone(unwrap(theirs), mine)
        self.model = [precision(chunk) for chunk in chunks]
        self.ddp = wrap_ddp(self.model, settings.use_distributed_optimizer)
        self.optimizer = build_optimizer(self.ddp, settings)
        self.scheduler = build_scheduler(self.optimizer, settings.lr, settings.min_lr, warmup_steps,
                                         total_steps, settings.weight_decay)
        self.fp16 = unwrap(self.model).config.fp16
        self.stats = torch.zeros(len(STATS))

    def values(self, batches: list[dict], width: int, micro_batch_size: int) -> None:
        """The current critic's values in each batch's next-token frame: batch["values"]."""

        def record(output, batch):
            batch["values"] = output[:, :-1].float() * batch["loss_mask"]

        for chunk in self.ddp:
            chunk.eval()
        forward_only(self.ddp, batches, record, width, micro_batch_size)

    def _loss(self, output, batch):
        mask = batch["loss_mask"]
        per_token, clipped = clipped_value_loss(output[:, :-1].float(), batch["values"],
                                                batch["returns"], self.clip_value)
        loss_sum, normalizer = reduce(per_token, mask, "token_mean")
        stats = torch.stack([loss_sum.detach(), normalizer, (clipped * mask).sum(), mask.sum()])
        self.stats = self.stats.to(stats.device) + stats.detach()  # no host sync per micro-batch
        return loss_sum, normalizer.round().to(torch.int), {}

    def update(self, batches: list[dict], width: int, micro_batch_size: int) -> tuple[bool, float]:
        return update(self.ddp, self.optimizer, batches, self._loss, width, micro_batch_size,
                      fp16=self.fp16)


def copy_backbone(policy, critic) -> None:
    """The policy's embedding, layers and final norm into the critic; its scalar head at zero
    (every value starts at 0). Same layout, so the local shards match one to one."""
    state = {k: v for k, v in policy.state_dict().items() if not k.startswith("output_layer")}
    result = critic.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing != (["score_head.weight"] if critic.post_process else []):
        raise RuntimeError(f"critic and policy parameters differ: {missing}")
    if critic.post_process:
        with torch.no_grad():
            critic.score_head.weight.zero_()
