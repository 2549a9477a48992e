"""The policy's passes over a step's experience, for every RL algorithm: the frozen reference's
log-probs, the rollout weights' (old) log-probs, the per-token advantages made once from them,
their whitening over the step, and the loss megatron's schedule trains (a mixin of Trainer).

``_experience`` and ``_update_stats`` collect the step's statistics on the device (no host sync
per micro-batch); step_metrics.py names them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..algorithms.common import whiten
from ..ops.logprobs import frame_log_probs
from .engine import forward_only


class PolicyPasses:
    def _before_forward(self):
        """What the policy's training-layout forwards run first (an MoE policy's routes)."""
        return None if self.routes is None else self.routes.before_forward

    def _log_probs(self, output, batch, with_entropy: bool = False):
        r = self.cfg.rollout
        if r.tempered_log_probs and r.temperature != 1.0:
            output = output / r.temperature  # the distribution the rollout sampled from
        return frame_log_probs(output, batch, self.trained.config.vocab_size, with_entropy)

    def _reference_log_probs(self, batches, width) -> None:
        """The frozen reference's log-probs of the sampled tokens (last stage only)."""

        def record(output, batch):
            batch["ref_log_probs"] = self._log_probs(output, batch)

        forward_only(self.reference, batches, record, width, self.cfg.train.micro_batch_size)

    def _old_log_probs(self, batches, width) -> None:
        """The rollout weights' log-probs, fixed before the first of several updates (PPO/GRPO
        with more than one epoch or mini-batch, or whitened advantages)."""

        def record(output, batch):
            batch["old_log_probs"] = self._log_probs(output, batch)
            self._advantages(batch, batch["old_log_probs"])

        for chunk in self.ddp:
            chunk.eval()  # as in the rollout
        forward_only(self.ddp, batches, record, width, self.cfg.train.micro_batch_size,
                     before_forward=self._before_forward())

    def _advantages(self, batch: dict, old_log_probs: torch.Tensor) -> torch.Tensor:
        """The batch's per-token advantages (and PPO's returns, for the critic), made once per
        step from the log-probs of the weights that rolled it out."""
        if "advantages" in batch:
            return batch["advantages"]
        mask = batch["loss_mask"]
        ref = batch.get("ref_log_probs")
        adv, rets = self.alg.token_advantages(batch["outcome"], mask, old_log_probs, ref,
                                              batch.get("values"), self.cfg.algorithm)
        batch["advantages"] = adv
        if rets is not None:
            batch["returns"] = rets
        kl = ((old_log_probs - ref) * mask).sum() if ref is not None else mask.sum() * 0
        # rollout (KV-cached) vs training log-probs of the same tokens: should be ~0
        mismatch = ((old_log_probs - batch["rollout_log_probs"]).abs() * mask).sum()
        self._experience += torch.stack([mask.sum(), kl, mismatch, (adv * mask).sum(),
                                         (adv ** 2 * mask).sum()]).detach().double()
        return adv

    def _whiten(self, batches) -> None:
        """Advantages to zero mean and unit std over this step's tokens on all dp ranks."""
        from megatron.core import parallel_state as ps

        tokens, _, _, total, total_sq = self._experience.tolist()
        stats = torch.tensor([tokens, total, total_sq], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats, group=ps.get_data_parallel_group())
        tokens, total, total_sq = stats.tolist()
        mean = total / max(tokens, 1.0)
        std = max(total_sq / max(tokens, 1.0) - mean ** 2, 0.0) ** 0.5
        if std < 1e-6 * max(1.0, abs(mean)):
            std = 1.0  # no spread to normalize: only center (dividing would amplify round-off)
        for batch in batches:
            if "advantages" in batch:
                batch["advantages"] = whiten(batch["advantages"], batch["loss_mask"], mean, std)

    def _loss(self, output, batch):
        mask = batch["loss_mask"]
        lp, entropy = self._log_probs(output, batch, with_entropy=True)
        # one update per rollout: the old policy is this forward's own (the ratio is exactly 1)
        old = batch["old_log_probs"] if "old_log_probs" in batch else lp.detach()
        adv = self._advantages(batch, old)
        loss_sum, normalizer, clipped = self.alg.loss(lp, old, adv, mask,
                                                      batch.get("ref_log_probs"),
                                                      self.cfg.algorithm)
        stats = torch.stack([mask.sum(), (entropy * mask).sum(), loss_sum.detach(),
                             normalizer.float(), (clipped * mask).sum()])
        self._update_stats += stats.detach()  # on the device: no host sync per micro-batch
        return loss_sum, normalizer.round().to(torch.int), {}

