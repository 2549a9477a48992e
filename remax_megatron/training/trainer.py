"""RL training, one loop for every algorithm: rollout -> reward -> per-token advantages ->
update(s) through megatron's schedule -> metrics and checkpoints (exact resume), on the shared
training core (training/core.py).

What differs between algorithms (which continuations to roll out, which extra models, how rewards
become per-token advantages, the loss) lives in remax_megatron/algorithms, one small module each;
the policy's passes over a step's experience in training/rl_passes.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..data.loader import PromptLoader, held_out, share_of
from ..data.prompts import Prompt, load_prompts
from ..data.tokenizer import eos_token_ids, pad_id
from ..models.builder import sequence_multiple, sequence_parallel_off
from ..models.checkpoint import DTYPE_NAMES, read_checkpoint
from ..rollout.engine import generate
from ..rollout.generate_command import left_pad
from ..rollout.routes import RolloutRoutes, TrainingRoutes
from ..rollout.sampling import SamplingParams
from ..runtime.distributed import agreed
from ..seeds import mix_seed
from . import demo
from .checkpointing import ExtraModel
from .config_checks import check_config
from .core import TrainingRun
from .critic import CRITIC_DIR, Critic, check_critic_fits, describe_critic
from .critic import STATS as CRITIC_STATS
from .engine import restore_schedule, update
from .experience import (
    RolloutShape, micro_batches, mini_batches, reward_items, sample_rows, split_rewards,
)
from .memory import model_state_bytes
from .metrics import RL_VIEW
from .policy import build_reference, check_policy, describe_policy, policy_tokenizer
from .rl_eval import greedy_evaluation
from .rl_passes import PolicyPasses
from .routing import RoutingStats
from .step_metrics import EXPERIENCE_STATS, UPDATE_STATS, gather_step_metrics

log = logging.getLogger(__name__)



@dataclass
class Experience:
    """One step's rollout, made ready for the updates."""

    batches: list  # micro-batch dicts (see experience.micro_batches), filled in by the passes
    width: int  # their sequence length
    out: object  # the GenerationOutput
    sampled: torch.Tensor  # [B, n] rewards of the trained responses
    greedy: torch.Tensor | None  # [B] rewards of the greedy responses (ReMax)
    times: list  # start, rollout end, reward end (time.time()), seconds in the critic


class Trainer(PolicyPasses, TrainingRun):
    LOADS = ("policy.load", "reward.load", "critic.load")
    VIEW = RL_VIEW

    @property
    def policy(self):
        return self.trained

    # --- setup: everything cheap and checkable, before any model is built --------------------
    def setup(self) -> None:
        cfg = self.cfg
        check_config(cfg, self.launch.world_size)
        self.alg = cfg.algorithm.module
        self.shape = RolloutShape(cfg.rollout.n_samples, self.alg.GREEDY_BASELINE)
        self.trained = describe_policy(cfg)
        self.tokenizer = policy_tokenizer(cfg)
        check_policy(cfg, self.trained.config, self.tokenizer,
                     cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
        self.loader = PromptLoader(self._prompts(), cfg.data.max_prompt_length,
                                   cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        self.eval_prompts = self._eval_prompts()
        self.has_eval = bool(self.eval_prompts)
        self.total_steps = self.planned_steps()
        self.rule_reward = self._rule_reward(self.loader.prompts[0].text)
        self.critic_source = None
        if self.alg.CRITIC:
            self.critic_source = describe_critic(
                cfg.critic.load, cfg.reward.load, self.trained.config, self.trained.meta,
                self.trained.config.vocab_size, self.tokenizer)
            check_critic_fits(self.critic_source, self.launch.world_size, cfg.parallel.tp,
                              cfg.parallel.pp,
                              cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)

    def inputs(self) -> dict:
        c = self.cfg
        rule_file = (c.reward.rule or "").rpartition(":")[0]
        return {"policy.load": c.policy.load, "reward.load": c.reward.load,
                "critic.load": c.critic.load, "data.path": c.data.path,
                "data.eval_path": c.data.eval_path,
                "reward.rule": rule_file if rule_file.endswith(".py") else None}

    def build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.reference = (build_reference(cfg, self.model, self._precision)
                          if self.alg.uses_reference(cfg.algorithm) else None)
        moe = self.trained.config.is_moe
        self.routes = TrainingRoutes(self.model, cfg.rollout.routing_replay) if moe else None
        self.routing = (RoutingStats(self.model, self.device,
                                     lambda layer: self.routes.known.get(layer)) if moe else None)
        self._rollout_routes = None
        self.critic = None
        if self.critic_source is not None:
            c = cfg.critic
            self.critic = Critic(
                self.critic_source, self.model, self._precision,
                self.optimizer_settings(t.lr if c.lr is None else c.lr,
                                        t.min_lr if c.min_lr is None else c.min_lr),
                t.warmup_steps, self.total_steps, cfg.algorithm.clip_value,
                load_weights=self.resume_from is None)
        self.reward = self.rule_reward or self._reward_model()
        self.eos = eos_token_ids(self.tokenizer, read_checkpoint(cfg.policy.load)
                                 if cfg.policy.load else None)
        self.pad = pad_id(self.tokenizer)

    def _prompts(self) -> list[Prompt]:
        if self.cfg.data.builtin:
            return [Prompt(i, text, list(self.tokenizer(text).input_ids))
                    for i, text in enumerate(demo.PROMPTS)]
        return load_prompts(self.cfg.data.path, self.tokenizer)

    def _eval_prompts(self) -> list[Prompt]:
        """The held-out prompts (data.eval_path), over-length ones dropped like training's."""
        d = self.cfg.data
        if d.eval_path is None:
            return []
        return held_out(load_prompts(d.eval_path, self.tokenizer), d.max_prompt_length,
                        d.eval_path, "prompts", "data.max_prompt_length")

    def _rule_reward(self, probe_prompt: str):
        """The rule, imported and called once on a real prompt before any model is built."""
        if self.cfg.reward.rule is None:
            return None
        from ..reward.rule import RuleReward

        return RuleReward(self.cfg.reward.rule, probe_prompts=[probe_prompt])

    def _reward_model(self):
        from megatron.core import parallel_state as ps

        from ..reward.model import RewardModelReward

        r = self.cfg.reward
        speaker = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
        return RewardModelReward(r.load, r.tp, r.pp, r.micro_batch_size, self.tokenizer,
                                 r.tokenizer, speaker, self.device, self.dtype)

    # --- what a checkpoint holds beyond the policy ----------------------------------------------
    def extra_models(self) -> list[ExtraModel]:
        if self.critic is None:
            return []
        meta = dataclasses.replace(self.critic.source.meta, dtype=DTYPE_NAMES[self.dtype])
        return [ExtraModel(CRITIC_DIR, self.critic.ddp, self.critic.optimizer, meta,
                           self.critic.source.config, self.critic.source.hf_config)]

    def extra_configs(self) -> dict:
        return {CRITIC_DIR: self.critic_source.config} if self.critic_source is not None else {}

    def extra_state(self) -> dict:
        return {"critic_scheduler": self.critic.scheduler.state_dict()} if self.critic else {}

    def restore(self, state: dict) -> list[str]:
        changed = super().restore(state)
        if self.critic is not None:
            changed += [f"critic {c}" for c in
                        restore_schedule(self.critic.scheduler, state["critic_scheduler"])]
        return changed

    # --- one step ---------------------------------------------------------------------------
    def _rollout(self, mine: list[tuple[int, Prompt]]):
        r = self.cfg.rollout
        sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
        ids, mask = left_pad([p.ids for _, p in mine], self.pad)
        if self.routes is not None:  # every token's experts, for the training forwards
            self._rollout_routes = RolloutRoutes(self.model, mask, self.shape.k, r.max_new_tokens)
        with sequence_parallel_off(self.ddp), self._recording():
            return generate(self.ddp, ids, mask,
                            continuations=self.shape.continuations(sampling),
                            max_new_tokens=r.max_new_tokens, eos_token_ids=self.eos,
                            vocab_size=self.trained.config.vocab_size,
                            seed=mix_seed(self.cfg.train.seed, self.step),
                            sample_ids=torch.tensor([uid for uid, _ in mine]),
                            pad_token_id=self.pad,
                            pipeline_micro_batches=r.pipeline_micro_batches,
                            cuda_graph=r.cuda_graph, tempered_log_probs=r.tempered_log_probs,
                            routes=self._rollout_routes)

    @contextlib.contextmanager
    def _recording(self):
        try:
            yield
        finally:
            if self._rollout_routes is not None:
                self._rollout_routes.close()

    def make_experience(self) -> Experience:
        """Roll out this rank's prompts, score them, and prepare everything the updates read:
        the reference's log-probs, the critic's values, the old log-probs and advantages where
        they must be fixed before the first update."""
        from megatron.core import parallel_state as ps

        alg, mbs = self.cfg.algorithm, self.cfg.train.micro_batch_size
        start = time.time()
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = share_of(self.loader.next_batch(), dp_rank, dp)

        self.heartbeat.enter("rollout", self.step + 1)
        out = self._rollout(mine)
        t_rollout = time.time()
        self.heartbeat.enter("reward", self.step + 1)
        items = reward_items(self.shape, mine, out, self.tokenizer)
        rewards = agreed(lambda: self.reward.score(items))
        every = self.cfg.log.samples_every
        if every and (self.step + 1) % every == 0 and self.runtime.is_main:
            self.samples = sample_rows(self.shape, items, rewards, self.cfg.log.samples)
        sampled, greedy = split_rewards(self.shape, rewards)
        outcome = self.alg.sequence_advantages(sampled, greedy, alg)
        t_reward = time.time()
        self.heartbeat.enter("update", self.step + 1)

        batches, width = micro_batches(self.shape, mine, out, outcome, self.pad, mbs, self.device,
                                       groups=alg.mini_batches or 1,
                                       width_multiple=sequence_multiple(self.ddp),
                                       routes=self._rollout_routes)
        self._rollout_routes = None
        self._experience = torch.zeros(len(EXPERIENCE_STATS), dtype=torch.float64,
                                       device=self.device)
        self._update_stats = torch.zeros(len(UPDATE_STATS), device=self.device)
        critic_seconds = 0.0
        if self.critic is not None:
            self.critic.stats = torch.zeros(len(CRITIC_STATS), device=self.device)
            self.critic.values(batches, width, mbs)
            critic_seconds = time.time() - t_reward
        if self.reference is not None:
            self._reference_log_probs(batches, width)
        if alg.updates_per_step > 1 or alg.whiten_advantages:
            self._old_log_probs(batches, width)
            if alg.whiten_advantages:
                self._whiten(batches)
        return Experience(batches, width, out, sampled, greedy,
                          [start, t_rollout, t_reward, critic_seconds])

    def evaluate(self) -> dict:
        return greedy_evaluation(self)

    def train_step(self) -> dict:
        """One step of whatever algorithm: experience, then its update(s)."""
        alg, mbs = self.cfg.algorithm, self.cfg.train.micro_batch_size
        # the LRs this step trains with (the scheduler moves them on at its end)
        lrs = {"lr": self.optimizer.param_groups[0]["lr"]}
        if self.critic is not None:
            lrs["critic/lr"] = self.critic.optimizer.param_groups[0]["lr"]
        exp = self.make_experience()
        policy, critic = [], []
        fp16 = self.dtype == torch.float16
        if self.routing is not None:
            self.routing.reset()
            self.routes.counts.zero_()
        for _ in range(alg.ppo_epochs or 1):
            for mini in mini_batches(exp.batches, alg.mini_batches or 1):
                policy.append(update(self.ddp, self.optimizer, mini, self._loss, exp.width, mbs,
                                     fp16, before_forward=self._before_forward()))
                if self.critic is not None:
                    tick = time.time()
                    critic.append(self.critic.update(mini, exp.width, mbs))
                    exp.times[3] += time.time() - tick
        if any(applied for applied, _ in policy):
            self.scheduler.step(increment=1)
        if any(applied for applied, _ in critic):
            self.critic.scheduler.step(increment=1)
        self.last_updates = len(policy)
        skipped = sum(not applied for applied, _ in policy + critic)
        if skipped:
            log.warning("step %d: non-finite loss or gradient: %d of %d updates skipped, their "
                        "weights unchanged", self.step + 1, skipped, len(policy + critic))
        t_train = time.time()
        self.step += 1
        start, t_rollout, t_reward, critic_seconds = exp.times
        metrics = gather_step_metrics(self, exp, policy, critic,
                                      (start, t_rollout, t_reward, t_train, critic_seconds), lrs)
        if self.routing is not None:
            self.routes.after()
            metrics.update(self.routing.metrics(len(exp.batches) * (alg.ppo_epochs or 1)))
            if not self.cfg.rollout.routing_replay:  # (replayed: the rollout's by design)
                counts = self.routes.counts.to(self.device)
                dist.all_reduce(counts)
                metrics["moe/routing_mismatch"] = counts[0].item() / max(counts[1].item(), 1.0)
        return metrics

    def model_states(self) -> dict[str, dict[str, int]]:
        """Bytes of parameters, gradients and optimizer states of every model on this rank
        (complete once the optimizers have stepped: Adam's moments are made on the first step)."""
        states = super().model_states()
        if self.critic is not None:
            states["critic"] = model_state_bytes(self.critic.model, self.critic.ddp,
                                                 self.critic.optimizer)
        if self.reference is not None:
            states["reference"] = model_state_bytes(self.reference)
        if hasattr(self.reward, "model"):
            states["reward_model"] = model_state_bytes(self.reward.model)
        return states

    def announce(self) -> None:
        log.info("training %s with %s for %d steps (%d prompts x %d samples per step, %d "
                 "dropped as too long) -> %s", self.trained.meta.architecture,
                 self.cfg.algorithm.name, self.total_steps, self.cfg.train.global_batch_size,
                 self.shape.n_samples, self.loader.dropped, self.out)

    def summary(self, first: dict, last: dict) -> str:
        greedy = (f" (greedy {first['reward/greedy']:.4f} -> {last['reward/greedy']:.4f})"
                  if "reward/greedy" in last else "")
        return (f"reward of sampled responses: {first['reward/sampled']:.4f} at step "
                f"{first['step']} -> {last['reward/sampled']:.4f} at step {last['step']}{greedy}")
