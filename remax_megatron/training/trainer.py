"""The ReMax training loop: rollout pairs -> rewards -> advantage -> loss through megatron's
schedule -> one optimizer step; metrics, checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..algorithms.remax import advantage, kl_penalty, policy_loss, returns
from ..config_io import ConfigError, save_yaml
from ..data.loader import PromptLoader, share_of
from ..data.prompts import Prompt, load_prompts
from ..data.tokenizer import check_fits, eos_token_ids, load_tokenizer
from ..convert.hf_files import GENERATION_CONFIG
from ..models.builder import build_policy, dtype_from_name, unwrap
from ..models.checkpoint import DTYPE_NAMES, CheckpointMeta, load_model, read_checkpoint
from ..models.hf_config import HFModelInfo, to_hf_config
from ..models.sharding import load_full_state_dict, seeded_full_weights
from ..ops.logprobs import vocab_parallel_log_probs
from ..reward import Scored
from ..rollout.engine import generate
from ..rollout.generate_command import left_pad
from ..rollout.sampling import GREEDY, SamplingParams
from ..runtime.distributed import init_runtime, read_launch_env, shutdown
from ..seeds import mix_seed
from . import demo
from .checkpointing import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from .config import RunConfig, check_config, snapshot
from .engine import OptimizerSettings, build_optimizer, forward_backward, wrap_ddp
from .metrics import MetricsLogger

log = logging.getLogger(__name__)

# per-step sums reduced over all ranks; each rank fills the part it owns
ROLLOUT_STATS = ("n", "reward_sampled", "reward_greedy", "adv", "adv_sq", "len_sampled",
                 "len_greedy", "generated_tokens")
TRAIN_STATS = ("tokens", "entropy", "kl", "loss", "normalizer", "logprob_mismatch")


@dataclass
class Policy:
    """What the loop needs to know about the policy beyond the modules."""

    config: object  # ModelConfig
    meta: CheckpointMeta
    hf_config: dict


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg = cfg
        world = read_launch_env().world_size
        check_config(cfg, world)
        self.out = Path(cfg.output_dir)
        # Everything cheap and checkable comes before any model is built.
        self.policy = self._describe_policy()
        self.tokenizer = self._tokenizer()
        check_fits(self.tokenizer, self.policy.config.vocab_size,
                   cfg.policy.tokenizer or cfg.policy.load or "the built-in tokenizer")
        prompts = self._prompts()
        limit = self.policy.config.max_position_embeddings
        if cfg.data.max_prompt_length + cfg.rollout.max_new_tokens > limit:
            raise ConfigError(
                f"data.max_prompt_length {cfg.data.max_prompt_length} + rollout.max_new_tokens "
                f"{cfg.rollout.max_new_tokens} exceeds the policy's {limit} positions: lower one")
        self.loader = PromptLoader(prompts, cfg.data.max_prompt_length,
                                   cfg.train.global_batch_size, cfg.train.seed, cfg.data.shuffle)
        self.total_steps = cfg.train.steps or max(
            1, int(cfg.train.epochs * self.loader.steps_per_epoch()))
        rule_reward = self._rule_reward()

        self.runtime = init_runtime(tp=cfg.parallel.tp, pp=cfg.parallel.pp, seed=cfg.train.seed,
                                    backend=cfg.parallel.backend, model=self.policy.config)
        self.device = self.runtime.device
        self.dtype = self._dtype()
        self.model = self._build_policy()
        self.reference = self._build_reference() if cfg.algorithm.kl_coef > 0 else None
        self.ddp = wrap_ddp(self.model, cfg.train.use_distributed_optimizer)
        t = cfg.train
        self.optimizer = build_optimizer(self.ddp, OptimizerSettings(
            lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
            use_distributed_optimizer=t.use_distributed_optimizer))
        self.scheduler = self._scheduler()
        self.reward = rule_reward or self._reward_model()
        self.eos = eos_token_ids(self.tokenizer, read_checkpoint(cfg.policy.load)
                                 if cfg.policy.load else None)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.step = 0
        if resume:
            self._resume()
        self.metrics = None
        if self.runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_yaml(snapshot(cfg), self.out / "config.yaml")
            self.metrics = MetricsLogger(self.out, self.total_steps, cfg.log.tensorboard,
                                         cfg.log.wandb_project, snapshot(cfg), self.step)

    # --- setup ------------------------------------------------------------------------------
    def _describe_policy(self) -> Policy:
        p = self.cfg.policy
        if p.load is not None:
            ckpt = read_checkpoint(p.load)
            if ckpt.meta.is_reward:
                raise ConfigError(f"policy.load={p.load} is a reward model; the policy must be "
                                  "a causal LM checkpoint")
            hf = ckpt.hf_config or to_hf_config(HFModelInfo(
                ckpt.config, ckpt.meta.architecture, ckpt.meta.model_type, False))
            return Policy(ckpt.config, ckpt.meta, hf)
        arch = "GPT2LMHeadModel" if p.model.family == "gpt2" else "LlamaForCausalLM"
        info = HFModelInfo(p.model, arch, p.model.family, False)
        meta = CheckpointMeta(kind="policy", architecture=arch, model_type=p.model.family,
                              dtype="fp32", vocab_size=p.model.vocab_size, source="random init")
        return Policy(p.model, meta, to_hf_config(info))

    def _tokenizer(self):
        p = self.cfg.policy
        if p.builtin_tokenizer:
            return demo.tokenizer()
        if p.load is None and p.tokenizer is None:
            raise ConfigError("policy.model needs policy.tokenizer (a tokenizer directory) or "
                              "policy.builtin_tokenizer: true")
        if p.load is None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(p.tokenizer)
        return load_tokenizer(read_checkpoint(p.load), p.tokenizer)

    def _prompts(self) -> list[Prompt]:
        if self.cfg.data.builtin:
            return [Prompt(i, text, list(self.tokenizer(text).input_ids))
                    for i, text in enumerate(demo.PROMPTS)]
        return load_prompts(self.cfg.data.path, self.tokenizer)

    def _rule_reward(self):
        if self.cfg.reward.rule is None:
            return None
        from ..reward.rule import RuleReward

        return RuleReward(self.cfg.reward.rule)

    def _dtype(self) -> torch.dtype:
        name = self.cfg.train.dtype
        if name == "auto":
            name = "bf16" if self.device.type == "cuda" else "fp32"
        if name != "fp32" and self.device.type != "cuda":
            raise ConfigError(f"train.dtype={name} needs a GPU here: use fp32 (or auto) on CPU")
        return dtype_from_name(name)

    def _build_policy(self):
        p = self.cfg.policy
        if p.load is not None:
            return self._precision(load_model(p.load)[0])
        # A fresh model starts from the same weights at every layout (see seeded_full_weights).
        model = build_policy(p.model, perform_initialization=False)
        load_full_state_dict(model, seeded_full_weights(model, self.cfg.train.seed))
        return self._precision(model)

    def _precision(self, model):
        """fp32 on CPU; on GPU bf16/fp16 through megatron's Float16Module (fp32 main params
        live in the optimizer)."""
        model = model.to(self.dtype)  # before the move: never the fp32 model on the GPU
        config = model.config
        config.params_dtype = self.dtype
        config.pipeline_dtype = self.dtype  # megatron sizes pipeline receive buffers by it
        config.bf16 = self.dtype == torch.bfloat16
        config.fp16 = self.dtype == torch.float16
        model = model.to(self.device)
        if self.dtype != torch.float32:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)
        return model

    def _build_reference(self):
        """A frozen copy of the initial policy (only when kl_coef > 0)."""
        p = self.cfg.policy
        if p.load is not None:
            ref = load_model(p.load)[0]
        else:
            ref = build_policy(p.model, perform_initialization=False)
            ref.load_state_dict(unwrap(self.model).state_dict())
        for param in ref.parameters():
            param.requires_grad_(False)
        return self._precision(ref).eval()

    def _reward_model(self):
        from megatron.core import parallel_state as ps

        from ..reward.model import RewardModelReward

        r = self.cfg.reward
        speaker = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
        return RewardModelReward(r.load, r.tp, r.pp, r.micro_batch_size, self.tokenizer,
                                 r.tokenizer, speaker, self.device, self.dtype)

    def _scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t = self.cfg.train
        return OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if t.warmup_steps else t.lr, max_lr=t.lr,
            min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
            lr_decay_steps=max(self.total_steps, t.warmup_steps + 1), lr_decay_style="cosine",
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=self.total_steps,
            wd_incr_style="constant")

    def _resume(self) -> None:
        path = latest_checkpoint(self.out)
        if path is None:
            log.warning("--resume: no checkpoint under %s, starting from step 0", self.out)
            return
        state = load_training_checkpoint(path, self.ddp, self.optimizer, self.scheduler)
        self.step = state["step"]
        self.loader.state.epoch, self.loader.state.cursor = state["loader"]
        log.info("resumed from %s at step %d", path, self.step)

    # --- one step ---------------------------------------------------------------------------
    def _sampling(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)

    def _rollout(self, mine: list[tuple[int, Prompt]]):
        ids, mask = left_pad([p.ids for _, p in mine], self.pad)
        return generate(self.ddp, ids, mask, continuations=[GREEDY, self._sampling()],
                        max_new_tokens=self.cfg.rollout.max_new_tokens, eos_token_ids=self.eos,
                        vocab_size=self.policy.config.vocab_size,
                        seed=mix_seed(self.cfg.train.seed, self.step),
                        sample_ids=torch.tensor([uid for uid, _ in mine]),
                        pad_token_id=self.pad,
                        pipeline_micro_batches=self.cfg.rollout.pipeline_micro_batches)

    def _items(self, mine, out) -> list[Scored]:
        items = []
        tokens, lengths = out.tokens.tolist(), out.lengths.tolist()  # one copy from the GPU
        for row in range(len(tokens)):
            uid, prompt = mine[row // 2]
            response = tokens[row][:lengths[row]]
            items.append(Scored(
                uid=2 * uid + row % 2, prompt_text=prompt.text,
                response_text=self.tokenizer.decode(response, skip_special_tokens=True),
                prompt_ids=list(prompt.ids), response_ids=response,
                ended_with_eos=out.finish_reason[row] == "eos"))
        return items

    def _micro_batches(self, mine, out, adv: torch.Tensor) -> tuple[list[dict], int]:
        """Right-padded [prompt; sampled response] rows split into micro-batches, with the
        response positions (in next-token-prediction frame), the rollout log-probs and A."""
        sampled = range(1, out.tokens.size(0), 2)
        tokens, lengths, log_probs = out.tokens.tolist(), out.lengths.tolist(), out.log_probs.cpu()
        seqs = [list(mine[r // 2][1].ids) + tokens[r][:lengths[r]] for r in sampled]
        width = max(len(s) for s in seqs)
        n = len(seqs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros(n, width - 1)
        rollout_lp = torch.zeros(n, width - 1)
        for i, (r, seq) in enumerate(zip(sampled, seqs)):
            ids[i, :len(seq)] = torch.tensor(seq)
            start, length = len(mine[r // 2][1].ids) - 1, lengths[r]
            mask[i, start:start + length] = 1
            rollout_lp[i, start:start + length] = log_probs[r, :length]
        m = self.cfg.train.micro_batch_size
        batches = []
        for s in range(0, n, m):
            batches.append({
                "input_ids": ids[s:s + m].to(self.device),
                "position_ids": torch.arange(width).expand(min(m, n - s), width).to(self.device),
                "loss_mask": mask[s:s + m].to(self.device),
                "rollout_log_probs": rollout_lp[s:s + m].to(self.device),
                "advantage": adv[s:s + m].to(self.device),
            })
        return batches, width

    def _reference_log_probs(self, batches, width) -> None:
        """Adds the frozen reference's log-probs of the sampled tokens (last stage only)."""
        vocab = self.policy.config.vocab_size

        def capture(output, batch):
            lp = vocab_parallel_log_probs(output[:, :-1], batch["input_ids"][:, 1:], vocab)
            batch["ref_log_probs"] = lp.detach()
            return lp.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        with torch.no_grad():
            self.reference.config.calculate_per_token_loss = True
            forward_backward(self.reference, batches, capture, seq_length=width,
                             micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True)

    def _loss(self, output, batch):
        alg = self.cfg.algorithm
        mask = batch["loss_mask"]
        lp, entropy = vocab_parallel_log_probs(output[:, :-1], batch["input_ids"][:, 1:],
                                               self.policy.config.vocab_size, with_entropy=True)
        kl = None
        kl_sum = torch.zeros((), device=lp.device)
        if "ref_log_probs" in batch:
            # the policy's own (training-forward) log-probs, as the official code does
            kl = kl_penalty(lp.detach(), batch["ref_log_probs"], alg.kl_coef)
            kl_sum = ((lp.detach() - batch["ref_log_probs"]) * mask).sum()
        rets = returns(batch["advantage"], mask, alg.gamma, kl)
        loss_sum, normalizer = policy_loss(lp, rets, mask, alg.loss_reduction)
        # rollout (KV-cached) vs training log-probs of the same tokens: should be ~0
        mismatch = ((lp.detach() - batch["rollout_log_probs"]).abs() * mask).sum()
        stats = torch.stack([mask.sum(), (entropy * mask).sum(), kl_sum, loss_sum.detach(),
                             normalizer.float(), mismatch])
        self._train_stats = self._train_stats + stats.detach().cpu()
        return loss_sum, normalizer.round().to(torch.int), {}

    def _grads_finite(self) -> bool:
        bad = torch.zeros((), device=self.device)
        for buffer in self.ddp.buffers:
            if not torch.isfinite(buffer.grad_data).all():
                bad.fill_(1.0)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def train_step(self) -> dict:
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        start = time.time()
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        batch = self.loader.next_batch()
        mine = share_of(batch, dp_rank, dp)

        out = self._rollout(mine)
        t_rollout = time.time()
        rewards = _agreed(lambda: self.reward.score(self._items(mine, out)))
        r_greedy, r_sampled = rewards[0::2], rewards[1::2]
        adv = advantage(r_sampled, r_greedy, cfg.algorithm.clip_advantage)
        t_reward = time.time()

        batches, width = self._micro_batches(mine, out, adv)
        if self.reference is not None:
            self._reference_log_probs(batches, width)
        self._train_stats = torch.zeros(len(TRAIN_STATS))
        self.ddp.train()
        # After a step megatron's fp32 optimizer leaves param.grad aliased to the DDP grad
        # buffer; the next backward would then add the first micro-batch's gradient twice.
        self.optimizer.zero_grad()
        forward_backward(self.ddp, batches, self._loss, seq_length=width,
                         micro_batch_size=cfg.train.micro_batch_size)
        applied, grad_norm = False, float("nan")
        if self.dtype == torch.float16 or self._grads_finite():
            # fp16: megatron's loss scaler finds overflows itself (and lowers the scale)
            applied, grad_norm, _ = self.optimizer.step()
        if applied:
            self.scheduler.step(increment=1)
        else:
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            log.warning("step %d: non-finite loss or gradient: update skipped, weights unchanged",
                        self.step + 1)
        t_train = time.time()
        self.step += 1
        return self._metrics(out, r_sampled, r_greedy, adv, applied, grad_norm,
                             (start, t_rollout, t_reward, t_train))

    def _metrics(self, out, r_sampled, r_greedy, adv, applied, grad_norm, times) -> dict:
        from megatron.core import parallel_state as ps

        speaker = ps.get_tensor_model_parallel_rank() == 0
        rollout = torch.zeros(len(ROLLOUT_STATS))
        if speaker and ps.is_pipeline_first_stage():
            lengths = out.lengths.float().cpu()
            rollout = torch.tensor([
                len(adv), r_sampled.sum(), r_greedy.sum(), adv.sum(), (adv ** 2).sum(),
                lengths[1::2].sum(), lengths[0::2].sum(), lengths.sum()])
        train = self._train_stats if speaker and ps.is_pipeline_last_stage() else \
            torch.zeros(len(TRAIN_STATS))
        totals = torch.cat([rollout, train]).double().to(self.device)
        dist.all_reduce(totals)
        start, t_rollout, t_reward, t_train = times
        spans = torch.tensor([t_rollout - start, t_reward - t_rollout, t_train - t_reward,
                              t_train - start, _peak_memory_gib(self.device)],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(spans, op=dist.ReduceOp.MAX)
        s = dict(zip(ROLLOUT_STATS + TRAIN_STATS, totals.tolist()))
        n, tokens = max(s["n"], 1.0), max(s["tokens"], 1.0)
        adv_mean = s["adv"] / n
        t_roll, t_rew, t_tr, t_step, peak = spans.tolist()
        return {
            "step": self.step,
            "reward/sampled": s["reward_sampled"] / n,
            "reward/greedy": s["reward_greedy"] / n,
            "advantage/mean": adv_mean,
            "advantage/std": max(s["adv_sq"] / n - adv_mean ** 2, 0.0) ** 0.5,
            "kl": s["kl"] / tokens,
            "response_length/sampled": s["len_sampled"] / n,
            "response_length/greedy": s["len_greedy"] / n,
            "entropy": s["entropy"] / tokens,
            "logprob_mismatch": s["logprob_mismatch"] / tokens,
            "loss": s["loss"] / max(s["normalizer"], 1.0),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped": 0 if applied else 1,
            "time/rollout": t_roll, "time/reward": t_rew, "time/train": t_tr, "time/step": t_step,
            "tokens_per_second": (s["generated_tokens"] + s["tokens"]) / max(t_step, 1e-9),
            "rollout_tokens_per_second": s["generated_tokens"] / max(t_roll, 1e-9),
            "memory/peak_gib": peak,
            "epoch": self.loader.state.epoch,
        }

    # --- the loop ---------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"step": self.step,
                 "loader": [self.loader.state.epoch, self.loader.state.cursor]}
        meta = dataclasses.replace(self.policy.meta, dtype=DTYPE_NAMES[self.dtype])
        return save_training_checkpoint(
            self.out, self.step, self.ddp, self.optimizer, self.scheduler, state, meta,
            self.policy.config, self.policy.hf_config, self.tokenizer,
            self.cfg.checkpoint.keep_last, extra_files=self._extra_files())

    def _extra_files(self) -> list[Path]:
        """Files of the source checkpoint that exports need (extra EOS ids live there)."""
        load = self.cfg.policy.load
        path = Path(load) / GENERATION_CONFIG if load else None
        return [path] if path is not None and path.is_file() else []

    def run(self, stop_after: int | None = None) -> list[dict]:
        """Train to the configured number of steps (or ``stop_after`` more steps)."""
        history = []
        every = self.cfg.checkpoint.save_every
        end = self.total_steps if stop_after is None else min(self.total_steps,
                                                              self.step + stop_after)
        if self.runtime.is_main:
            log.info("training %s for %d steps (%d prompts per step, %d dropped as too long) "
                     "-> %s", self.policy.meta.architecture, self.total_steps,
                     self.cfg.train.global_batch_size, self.loader.dropped, self.out)
        while self.step < end:
            metrics = self.train_step()
            history.append(metrics)
            if self.metrics is not None:
                self.metrics.log(metrics)
            if every and self.step % every == 0 and self.step < self.total_steps:
                self.save()
        if self.step >= self.total_steps:
            self.save()
        if self.metrics is not None:
            plot = self.metrics.close(self.cfg.log.plot)
            if history:
                first, last = self.metrics.history[0], self.metrics.history[-1]
                log.info("reward of sampled responses: %.4f at step %d -> %.4f at step %d "
                         "(greedy %.4f -> %.4f)%s", first["reward/sampled"], first["step"],
                         last["reward/sampled"], last["step"], first["reward/greedy"],
                         last["reward/greedy"], f"; plot: {plot}" if plot else "")
        return history

    def close(self) -> None:
        shutdown()


def _agreed(fn):
    """Run ``fn`` on every rank; if it raised a ConfigError on any rank, raise it on all of them
    (a rule reward failing on one data-parallel rank must not leave the others waiting)."""
    result, error = None, None
    try:
        result = fn()
    except ConfigError as err:
        error = str(err)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise ConfigError(first)
    return result


def _peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
