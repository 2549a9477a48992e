"""The training loop, one for every algorithm: rollout -> reward -> per-token advantages ->
update(s) through megatron's schedule -> metrics and checkpoints (exact resume).

What differs between algorithms (which continuations to roll out, which extra models, how rewards
become per-token advantages, the loss) lives in remax_megatron/algorithms, one small module each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..algorithms.common import whiten
from ..config_io import ConfigError, save_yaml
from ..data.loader import PromptLoader, share_of
from ..data.prompts import Prompt, load_prompts
from ..convert.hf_files import GENERATION_CONFIG
from ..data.tokenizer import eos_token_ids
from ..models.builder import dtype_from_name, sequence_multiple, sequence_parallel_off
from ..models.checkpoint import DTYPE_NAMES, read_checkpoint
from ..models.locate import resolve_checkpoint
from ..ops.logprobs import frame_log_probs
from ..path_checks import check_apart, overlap
from ..rollout.engine import generate
from ..rollout.generate_command import left_pad
from ..rollout.routes import RolloutRoutes, TrainingRoutes
from ..rollout.sampling import GREEDY, SamplingParams
from ..runtime.distributed import agreed, init_runtime, read_launch_env, shutdown
from ..runtime.heartbeat import Heartbeat
from ..seeds import mix_seed
from . import demo
from .checkpointing import (
    ExtraModel, check_training_checkpoint, load_training_checkpoint, save_training_checkpoint,
)
from .config import RunConfig, check_config, snapshot
from .critic import CRITIC_DIR, Critic, check_critic_fits, describe_critic
from .critic import STATS as CRITIC_STATS
from .engine import (
    OptimizerSettings, apply_optimizer_settings, build_optimizer, build_scheduler, forward_only,
    optimizer_settings, restore_schedule, to_precision, update, wrap_ddp,
)
from .export import HF_DIR, export_hf
from .guards import SkippedSteps
from .policy import build_policy, build_reference, check_policy, describe_policy, policy_tokenizer
from .experience import (
    RolloutShape, micro_batches, mini_batches, reward_items, sample_rows, split_rewards,
)
from .memory import format_states, model_state_bytes
from .metrics import MetricsLogger
from .routing import RoutingStats
from .run_dir import RunDirectory, newest_checkpoint
from .step_metrics import (
    EXPERIENCE_STATS, ROLLOUT_STATS, UPDATE_STATS, peak_memory_gib, step_metrics,
)

log = logging.getLogger(__name__)

EVAL_SHAPE = RolloutShape(1, False)  # one greedy response per held-out prompt


@dataclass
class Experience:
    """One step's rollout, made ready for the updates."""

    batches: list  # micro-batch dicts (see experience.micro_batches), filled in by the passes
    width: int  # their sequence length
    out: object  # the GenerationOutput
    sampled: torch.Tensor  # [B, n] rewards of the trained responses
    greedy: torch.Tensor | None  # [B] rewards of the greedy responses (ReMax)
    times: list  # start, rollout end, reward end (time.time()), seconds in the critic


class Trainer:
    def __init__(self, cfg: RunConfig, resume=False, overwrite: bool = False,
                 allow_other_files: bool = False):
        """``resume``: False, True (a checkpoint must exist) or "auto"; ``overwrite``: remove a
        previous run's files from the output directory first; ``allow_other_files``: start in
        an output directory that holds files no run wrote (see run_dir.py)."""
        self.cfg = cfg
        launch = read_launch_env()
        _resolve_loads(cfg)
        check_config(cfg, launch.world_size)
        self.alg = cfg.algorithm.module
        self.shape = RolloutShape(cfg.rollout.n_samples, self.alg.GREEDY_BASELINE)
        self.out = Path(cfg.output_dir)
        # Everything cheap and checkable comes before any model is built.
        self.policy = describe_policy(cfg)
        self.tokenizer = policy_tokenizer(cfg)
        check_policy(cfg, self.policy.config, self.tokenizer,
                     cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
        prompts = self._prompts()
        self.loader = PromptLoader(prompts, cfg.data.max_prompt_length,
                                   cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        self.eval_prompts = self._eval_prompts()
        self.total_steps = cfg.train.steps or max(
            1, int(cfg.train.epochs * self.loader.steps_per_epoch()))
        rule_reward = self._rule_reward(self.loader.prompts[0].text)
        critic_source = None
        if self.alg.CRITIC:
            critic_source = describe_critic(
                cfg.critic.load, cfg.reward.load, self.policy.config, self.policy.meta,
                self.policy.config.vocab_size, self.tokenizer)
            check_critic_fits(critic_source, launch.world_size, cfg.parallel.tp, cfg.parallel.pp,
                              cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
        self.run_dir = RunDirectory(self.out, resume, overwrite, allow_other_files)
        self._check_inputs_apart_from_output(removes=overwrite or self.run_dir.resume == "auto")
        self.runtime = init_runtime(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.train.seed,
                                    backend=cfg.parallel.backend, model=self.policy.config,
                                    ep=cfg.parallel.ep,
                                    timeout_minutes=cfg.parallel.timeout_minutes)
        self.heartbeat = Heartbeat(self.runtime.rank, self.runtime.world_size,
                                   cfg.parallel.timeout_minutes)
        try:
            # Global rank 0 owns the output directory (lock, refuse or clean, decide on resume);
            # every rank hears of a refusal, and of the checkpoint to resume from.
            plan = agreed(lambda: self._plan(critic_source) if self.runtime.is_main else None)
            shared = [str(plan.resume_from) if plan and plan.resume_from else None]
            dist.broadcast_object_list(shared, src=0)
            self.resume_from = Path(shared[0]) if shared[0] else None
            self._build(critic_source, rule_reward)
        except BaseException:
            self.heartbeat.close()
            self.run_dir.close()
            raise

    def _plan(self, critic_source):
        plan = self.run_dir.prepare(newest_checkpoint)
        if plan.resume_from is not None:
            self._check_resumable(plan.resume_from, critic_source)
        return plan

    def _check_inputs_apart_from_output(self, removes: bool) -> None:
        """output_dir is no input and lies inside none; with --overwrite (and --resume auto
        without a checkpoint), which remove the old run's files, it holds none either."""
        c = self.cfg
        rule_file = (c.reward.rule or "").rpartition(":")[0]
        inputs = {"policy.load": c.policy.load, "reward.load": c.reward.load,
                  "critic.load": c.critic.load, "data.path": c.data.path,
                  "data.eval_path": c.data.eval_path,
                  "reward.rule": rule_file if rule_file.endswith(".py") else None}
        for name, value in inputs.items():
            if not isinstance(value, str) or value == "policy":
                continue
            how = overlap(self.out, value)
            if how in ("is", "lies inside"):
                check_apart("output_dir", self.out, {name: value})
            if how == "contains" and removes:
                raise ConfigError(f"{name}={value} lies inside output_dir {self.out}, whose "
                                  "previous run's files --overwrite / --resume auto may remove: "
                                  "copy it elsewhere or choose another output_dir")

    def _build(self, critic_source, rule_reward) -> None:
        cfg = self.cfg
        self.device = self.runtime.device
        self.dtype = self._dtype()
        self.model = build_policy(cfg, self._precision)
        self.reference = (build_reference(cfg, self.model, self._precision)
                          if self.alg.uses_reference(cfg.algorithm) else None)
        self.ddp = wrap_ddp(self.model, cfg.train.use_distributed_optimizer)
        moe = self.policy.config.is_moe
        self.routes = TrainingRoutes(self.model, cfg.rollout.routing_replay) if moe else None
        self.routing = (RoutingStats(self.model, self.device,
                                     lambda layer: self.routes.known.get(layer)) if moe else None)
        self._rollout_routes = None
        t = cfg.train
        self.optimizer = build_optimizer(self.ddp, self._optimizer_settings(t.lr, t.min_lr))
        self.scheduler = build_scheduler(self.optimizer, t.lr, t.min_lr, t.warmup_steps,
                                         self.total_steps, t.weight_decay)
        self.critic = None
        if critic_source is not None:
            c = cfg.critic
            self.critic = Critic(
                critic_source, self.model, self._precision,
                self._optimizer_settings(t.lr if c.lr is None else c.lr,
                                         t.min_lr if c.min_lr is None else c.min_lr),
                t.warmup_steps, self.total_steps, cfg.algorithm.clip_value,
                load_weights=self.resume_from is None)
        self.reward = rule_reward or self._reward_model()
        self.eos = eos_token_ids(self.tokenizer, read_checkpoint(cfg.policy.load)
                                 if cfg.policy.load else None)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.step = 0
        self.last_updates = 0  # policy updates in the last step (skipped_steps counts them)
        self.skipped_steps = SkippedSteps(
            0 if self.dtype == torch.float16 else cfg.train.max_skipped_steps)
        self.samples = None  # a few prompts with their responses, on sample steps (rank 0)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        self.metrics = None
        if self.runtime.is_main:
            save_yaml(snapshot(cfg), self.out / "config.yaml")
            self.metrics = MetricsLogger(self.out, self.total_steps, cfg.log.tensorboard,
                                         cfg.log.wandb_project, snapshot(cfg), self.step)

    # --- setup ------------------------------------------------------------------------------
    def _prompts(self) -> list[Prompt]:
        if self.cfg.data.builtin:
            return [Prompt(i, text, list(self.tokenizer(text).input_ids))
                    for i, text in enumerate(demo.PROMPTS)]
        return load_prompts(self.cfg.data.path, self.tokenizer)

    def _eval_prompts(self) -> list[Prompt]:
        """The held-out prompts (data.eval_path), over-length ones dropped like training's."""
        path = self.cfg.data.eval_path
        if path is None:
            return []
        prompts = load_prompts(path, self.tokenizer)
        kept = [p for p in prompts if len(p.ids) <= self.cfg.data.max_prompt_length]
        if not kept:
            raise ConfigError(f"data.eval_path={path}: none of its {len(prompts)} prompts fits "
                              f"data.max_prompt_length={self.cfg.data.max_prompt_length}")
        if len(kept) < len(prompts):
            log.warning("data.eval_path: dropped %d of %d prompts longer than "
                        "data.max_prompt_length", len(prompts) - len(kept), len(prompts))
        return kept

    def _rule_reward(self, probe_prompt: str):
        """The rule, imported and called once on a real prompt before any model is built."""
        if self.cfg.reward.rule is None:
            return None
        from ..reward.rule import RuleReward

        return RuleReward(self.cfg.reward.rule, probe_prompts=[probe_prompt])

    def _dtype(self) -> torch.dtype:
        name = self.cfg.train.dtype
        if name == "auto":
            name = "bf16" if self.device.type == "cuda" else "fp32"
        return dtype_from_name(name)

    def _precision(self, model):
        return to_precision(model, self.dtype, self.device)

    def _reward_model(self):
        from megatron.core import parallel_state as ps

        from ..reward.model import RewardModelReward

        r = self.cfg.reward
        speaker = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
        return RewardModelReward(r.load, r.tp, r.pp, r.micro_batch_size, self.tokenizer,
                                 r.tokenizer, speaker, self.device, self.dtype)

    def _optimizer_settings(self, lr: float, min_lr: float) -> OptimizerSettings:
        t = self.cfg.train
        return OptimizerSettings(
            lr=lr, min_lr=min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
            use_distributed_optimizer=t.use_distributed_optimizer)

    def _extra_models(self) -> list[ExtraModel]:
        if self.critic is None:
            return []
        meta = dataclasses.replace(self.critic.source.meta, dtype=DTYPE_NAMES[self.dtype])
        return [ExtraModel(CRITIC_DIR, self.critic.ddp, self.critic.optimizer, meta,
                           self.critic.source.config, self.critic.source.hf_config)]

    def _check_resumable(self, path: Path, critic_source) -> None:
        """Everything about the checkpoint that can be checked before any model is built: its
        files, its models against this run's, the optimizer type."""
        critic = {CRITIC_DIR: critic_source.config} if critic_source is not None else None
        state = check_training_checkpoint(path, self.policy.config, critic)
        distributed = state.get("use_distributed_optimizer")  # absent: written before it was kept
        if distributed is not None and distributed != self.cfg.train.use_distributed_optimizer:
            raise ConfigError(f"{path} was saved with train.use_distributed_optimizer="
                              f"{str(distributed).lower()}: resume with the same setting (the "
                              "two optimizers store their state differently)")

    def _resume(self, path: Path) -> None:
        # The run's config wins over the checkpoint's (more steps, another LR or betas): the
        # param groups' settings are put back after the load, and the schedule rebuilt from it
        # at the saved step.
        mine = optimizer_settings(self.optimizer)
        critic_mine = optimizer_settings(self.critic.optimizer) if self.critic else None
        state = load_training_checkpoint(path, self.ddp, self.optimizer, None,
                                         self._extra_models())
        apply_optimizer_settings(self.optimizer, mine)
        changed = restore_schedule(self.scheduler, state["scheduler"])
        if self.critic is not None:
            apply_optimizer_settings(self.critic.optimizer, critic_mine)
            changed += [f"critic {c}" for c in
                        restore_schedule(self.critic.scheduler, state["critic_scheduler"])]
        self.step = state["step"]
        self.loader.state.epoch, self.loader.state.cursor = state["loader"]
        log.info("resumed from %s at step %d of %d", path, self.step, self.total_steps)
        if changed and self.runtime.is_main:
            log.info("resume: the LR schedule follows this run's config, not the checkpoint's: "
                     "%s", "; ".join(changed))

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
                            vocab_size=self.policy.config.vocab_size,
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

    def _before_forward(self):
        """What the policy's training-layout forwards run first (an MoE policy's routes)."""
        return None if self.routes is None else self.routes.before_forward

    def _log_probs(self, output, batch, with_entropy: bool = False):
        r = self.cfg.rollout
        if r.tempered_log_probs and r.temperature != 1.0:
            output = output / r.temperature  # the distribution the rollout sampled from
        return frame_log_probs(output, batch, self.policy.config.vocab_size, with_entropy)

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

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy responses to the held-out prompts (data.eval_path), scored by the reward (the
        official ReMax code's evaluation). Every rank calls it."""
        from megatron.core import parallel_state as ps

        self.heartbeat.enter("evaluate", self.step)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        # as many rows per call as a training rollout generates (prompts x continuations)
        per_call = max(1, self.cfg.train.global_batch_size // dp * self.shape.k)
        mine = share_of(list(enumerate(self.eval_prompts)), dp_rank, dp)
        # every rank makes the same number of reward calls (a reward model scores collectively)
        calls = -(-len(self.eval_prompts) // (dp * per_call))
        totals = torch.zeros(3, dtype=torch.float64)  # responses, reward sum, length sum
        for call in range(calls):
            chunk = mine[call * per_call:(call + 1) * per_call]
            items, lengths = [], torch.zeros(0)
            if chunk:
                ids, mask = left_pad([p.ids for _, p in chunk], self.pad)
                with sequence_parallel_off(self.ddp):
                    out = generate(
                        self.ddp, ids, mask, continuations=[GREEDY],
                        max_new_tokens=self.cfg.rollout.max_new_tokens, eos_token_ids=self.eos,
                        vocab_size=self.policy.config.vocab_size, seed=0,
                        sample_ids=torch.tensor([i for i, _ in chunk]), pad_token_id=self.pad,
                        pipeline_micro_batches=self.cfg.rollout.pipeline_micro_batches,
                        cuda_graph=self.cfg.rollout.cuda_graph)
                items, lengths = reward_items(EVAL_SHAPE, chunk, out, self.tokenizer), out.lengths
            rewards = agreed(lambda: self.reward.score(items) if items or self.reward.collective
                              else torch.zeros(0))
            if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
                totals += torch.tensor([len(items), float(rewards.sum()),
                                        float(lengths.float().sum())], dtype=torch.float64)
        totals = totals.to(self.device)
        dist.all_reduce(totals)
        count, reward, length = totals.tolist()
        return {"eval/reward": reward / max(count, 1.0),
                "eval/response_length": length / max(count, 1.0), "eval/prompts": int(count)}

    def _eval_due(self) -> bool:
        every = self.cfg.log.eval_every
        return bool(self.eval_prompts) and (
            self.step == self.total_steps or (every > 0 and self.step % every == 0))

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
        metrics = self._metrics(exp.out, exp.sampled, exp.greedy, policy, critic,
                                (start, t_rollout, t_reward, t_train, critic_seconds), lrs)
        if self.routing is not None:
            self.routes.after()
            metrics.update(self.routing.metrics(len(exp.batches) * (alg.ppo_epochs or 1)))
            if not self.cfg.rollout.routing_replay:  # (replayed: the rollout's by design)
                counts = self.routes.counts.to(self.device)
                dist.all_reduce(counts)
                metrics["moe/routing_mismatch"] = counts[0].item() / max(counts[1].item(), 1.0)
        return metrics

    def _metrics(self, out, sampled, greedy, policy, critic, times, lrs) -> dict:
        from megatron.core import parallel_state as ps

        speaker = ps.get_tensor_model_parallel_rank() == 0
        rollout = torch.zeros(len(ROLLOUT_STATS), dtype=torch.float64)
        if speaker and ps.is_pipeline_first_stage():
            lengths = out.lengths.float().cpu().view(-1, self.shape.k)
            first = int(self.shape.greedy)
            rollout = torch.tensor([
                sampled.size(0), sampled.numel(), sampled.sum(), (sampled ** 2).sum(),
                greedy.sum() if greedy is not None else 0.0, lengths[:, first:].sum(),
                lengths[:, 0].sum() if greedy is not None else 0.0, lengths.sum()],
                dtype=torch.float64)
        last = speaker and ps.is_pipeline_last_stage()
        critic_stats = (self.critic.stats if self.critic is not None
                        else torch.zeros(len(CRITIC_STATS), device=self.device))
        train = torch.cat([self._experience, self._update_stats.double(), critic_stats.double()])
        totals = torch.cat([rollout.to(self.device), train if last else torch.zeros_like(train)])
        dist.all_reduce(totals)
        start, t_rollout, t_reward, t_train, t_critic = times
        spans = torch.tensor([t_rollout - start, t_reward - t_rollout, t_critic,
                              t_train - t_reward - t_critic, t_train - start,
                              peak_memory_gib(self.device)],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(spans, op=dist.ReduceOp.MAX)
        s = dict(zip(ROLLOUT_STATS + EXPERIENCE_STATS + UPDATE_STATS + CRITIC_STATS,
                     totals.tolist()))
        return step_metrics(s, spans.tolist(), policy, critic if self.critic is not None else None,
                            lrs, step=self.step, epoch=self.loader.state.epoch,
                            greedy=self.shape.greedy,
                            clipped=self.cfg.algorithm.clip_ratio is not None)

    def model_states(self) -> dict[str, dict[str, int]]:
        """Bytes of parameters, gradients and optimizer states of every model on this rank
        (complete once the optimizers have stepped: Adam's moments are made on the first step)."""
        states = {"policy": model_state_bytes(self.model, self.ddp, self.optimizer)}
        if self.critic is not None:
            states["critic"] = model_state_bytes(self.critic.model, self.critic.ddp,
                                                 self.critic.optimizer)
        if self.reference is not None:
            states["reference"] = model_state_bytes(self.reference)
        if hasattr(self.reward, "model"):
            states["reward_model"] = model_state_bytes(self.reward.model)
        return states

    # --- the loop ---------------------------------------------------------------------------
    def save(self) -> Path:
        self.heartbeat.enter("save", self.step)
        state = {"step": self.step,
                 "loader": [self.loader.state.epoch, self.loader.state.cursor],
                 "use_distributed_optimizer": self.cfg.train.use_distributed_optimizer}
        if self.critic is not None:
            state["critic_scheduler"] = self.critic.scheduler.state_dict()
        meta = dataclasses.replace(self.policy.meta, dtype=DTYPE_NAMES[self.dtype])
        return save_training_checkpoint(
            self.out, self.step, self.ddp, self.optimizer, self.scheduler, state, meta,
            self.policy.config, self.policy.hf_config, self.tokenizer,
            self.cfg.checkpoint.keep_last, extra_files=self._extra_files(),
            extra_models=self._extra_models())

    def _extra_files(self) -> list[Path]:
        """Files of the source checkpoint that exports need (extra EOS ids live there)."""
        load = self.cfg.policy.load
        path = Path(load) / GENERATION_CONFIG if load else None
        return [path] if path is not None and path.is_file() else []

    def run(self, stop_after: int | None = None) -> list[dict]:
        """Train to the configured number of steps (or ``stop_after`` more steps). A collective
        that times out (a rank hung) is one line naming the silent rank (runtime/heartbeat.py)."""
        try:
            return self._run(stop_after)
        except RuntimeError as err:
            message = self.heartbeat.explain(err)
            if message is None:
                raise
            raise ConfigError(message) from None

    def _run(self, stop_after: int | None) -> list[dict]:
        history = []
        every = self.cfg.checkpoint.save_every
        end = self.total_steps if stop_after is None else min(self.total_steps,
                                                              self.step + stop_after)
        if self.runtime.is_main:
            log.info("training %s with %s for %d steps (%d prompts x %d samples per step, %d "
                     "dropped as too long) -> %s", self.policy.meta.architecture,
                     self.cfg.algorithm.name, self.total_steps, self.cfg.train.global_batch_size,
                     self.shape.n_samples, self.loader.dropped, self.out)
        if self.eval_prompts and self.step == 0:
            before = self.evaluate()  # the starting point, as the official code reports it
            if self.metrics is not None:
                self.metrics.log_eval(0, before)
        while self.step < end:
            self.samples = None
            metrics = self.train_step()
            if not history and self.runtime.is_main:
                log.info(format_states(self.model_states()))
            if self._eval_due():
                result = self.evaluate()
                metrics.update(result)
                if self.metrics is not None:
                    self.metrics.log_eval(self.step, result)
            history.append(metrics)
            if self.metrics is not None:
                self.metrics.log(metrics)
                if self.samples:
                    self.metrics.log_samples(self.step, self.samples)
            self.skipped_steps.after_step(self.step, metrics["skipped"], self.last_updates)
            if every and self.step % every == 0 and self.step < self.total_steps:
                self.save()
        final = self.save() if self.step >= self.total_steps else None
        if self.metrics is not None:
            plot = self.metrics.close(self.cfg.log.plot)
            if history:
                first, last = self.metrics.history[0], self.metrics.history[-1]
                greedy = (f" (greedy {first['reward/greedy']:.4f} -> {last['reward/greedy']:.4f})"
                          if "reward/greedy" in last else "")
                log.info("reward of sampled responses: %.4f at step %d -> %.4f at step %d%s%s",
                         first["reward/sampled"], first["step"], last["reward/sampled"],
                         last["step"], greedy, f"; plot: {plot}" if plot else "")
        if final is not None and self.cfg.checkpoint.export_hf and self.runtime.is_main:
            export_hf(final, self.out / HF_DIR)  # last: the run's own outputs are all written
        return history

    def close(self) -> None:
        self.heartbeat.close()
        shutdown()
        self.run_dir.close()


def _resolve_loads(cfg: RunConfig) -> None:
    """policy.load, reward.load and critic.load may name a run directory, its checkpoints/ or
    checkpoints/latest: each becomes the newest complete checkpoint there (logged)."""
    for section, key in (("policy", "load"), ("reward", "load"), ("critic", "load")):
        part = getattr(cfg, section)
        value = getattr(part, key)
        if isinstance(value, str) and value != "policy" and Path(value).exists():
            # (a missing path gets check_config's error, with its hint for that setting)
            setattr(part, key, str(resolve_checkpoint(value, f"{section}.{key}")))
