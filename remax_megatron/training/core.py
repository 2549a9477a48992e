"""The training core that every kind of training shares (RL, SFT, reward-model training): the
run directory and its lock, the runtime and process groups, the trained model at the run's
tp/pp(/ep) layout with megatron DDP, Adam and the LR schedule, checkpoints (save, exact resume,
export), and the loop with its metrics, evaluations and progress.

A kind of training is a subclass that says what is special about it:
  setup()         cheap checks and its data, before anything is built; sets total_steps
  build_model()   the trained model's chunks (default: the policy, training/policy.py)
  build()         whatever else it needs, once the model, optimizer and schedule exist
  train_step()    one step (self.step moves on) -> its metrics row
  evaluate()      held-out metrics (every rank calls it), when has_eval
and, where it has them, extra trained models and state to checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from ..config_io import ConfigError, save_yaml, to_dict
from ..convert.hf_files import GENERATION_CONFIG
from ..models.builder import dtype_from_name
from ..models.checkpoint import DTYPE_NAMES
from ..models.locate import resolve_checkpoint
from ..path_checks import check_apart, overlap
from ..runtime.distributed import agreed, init_runtime, read_launch_env, shutdown
from ..runtime.heartbeat import Heartbeat
from .checkpoint_checks import check_training_checkpoint
from .checkpointing import ExtraModel, load_training_checkpoint, save_training_checkpoint
from .engine import (
    OptimizerSettings, apply_optimizer_settings, build_optimizer, build_scheduler,
    optimizer_settings, restore_schedule, to_precision, wrap_ddp,
)
from .export import HF_DIR, export_hf
from .guards import SkippedSteps
from .memory import format_states, model_state_bytes
from .metrics import MetricsLogger
from .policy import build_policy
from .run_dir import RunDirectory, newest_checkpoint

log = logging.getLogger(__name__)


class TrainingRun:
    LOADS = ("policy.load",)  # settings that may name a run directory (resolved to a checkpoint)
    VIEW = None  # metrics.View: how the progress line, evaluations and plot look
    MODEL_NAME = "policy"  # what the trained model is called in logs

    def __init__(self, cfg, resume=False, overwrite: bool = False,
                 allow_other_files: bool = False):
        """``resume``: False, True (a checkpoint must exist) or "auto"; ``overwrite``: remove a
        previous run's files from the output directory first; ``allow_other_files``: start in
        an output directory that holds files no run wrote (see run_dir.py)."""
        self.cfg = cfg
        self.launch = read_launch_env()
        resolve_loads(cfg, self.LOADS)
        self.out = Path(cfg.output_dir)
        self.samples = None  # a few examples for people, on some steps (rank 0)
        self.setup()  # everything cheap and checkable comes before any model is built
        self.run_dir = RunDirectory(self.out, resume, overwrite, allow_other_files)
        self._check_inputs_apart_from_output(removes=overwrite or self.run_dir.resume == "auto")
        p = cfg.parallel
        self.runtime = init_runtime(tp=p.tp, pp=p.pp, seed=cfg.train.seed, backend=p.backend,
                                    model=self.trained.config, ep=p.ep,
                                    timeout_minutes=p.timeout_minutes)
        self.heartbeat = Heartbeat(self.runtime.rank, self.runtime.world_size, p.timeout_minutes)
        try:
            # Global rank 0 owns the output directory (lock, refuse or clean, decide on resume);
            # every rank hears of a refusal, and of the checkpoint to resume from.
            plan = agreed(lambda: self._plan() if self.runtime.is_main else None)
            shared = [str(plan.resume_from) if plan and plan.resume_from else None]
            dist.broadcast_object_list(shared, src=0)
            self.resume_from = Path(shared[0]) if shared[0] else None
            self._build()
        except BaseException:
            self.heartbeat.close()
            self.run_dir.close()
            raise

    # --- what a kind of training provides --------------------------------------------------
    trained = None  # training/policy.Policy: the trained model's config, metadata, HF config
    tokenizer = None
    total_steps = 0
    has_eval = False

    def setup(self) -> None:
        raise NotImplementedError

    def build_model(self) -> list:
        return build_policy(self.cfg, self._precision)

    def build(self) -> None:
        """The rest of the run's parts, once the trained model and its optimizer exist."""

    def train_step(self) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def inputs(self) -> dict:
        """Input files and directories by setting, none of which output_dir may hold."""
        return {"policy.load": self.cfg.policy.load}

    def planned_steps(self) -> int:
        """train.steps, or train.epochs over the loader's data."""
        t = self.cfg.train
        return t.steps or max(1, int(t.epochs * self.loader.steps_per_epoch()))

    def data_position(self) -> list:
        return [self.loader.state.epoch, self.loader.state.cursor]

    def restore(self, state: dict) -> list[str]:
        """The kind's own state from a checkpoint; returns schedule settings that changed."""
        self.loader.state.epoch, self.loader.state.cursor = state["loader"]
        return []

    def extra_state(self) -> dict:
        return {}

    def extra_models(self) -> list[ExtraModel]:
        """Trained models saved beside the main one (PPO's critic)."""
        return []

    def extra_configs(self) -> dict:
        """{checkpoint subdirectory: ModelConfig} of the extra models, for resume checks."""
        return {}

    def summary(self, first: dict, last: dict) -> str:
        """The run's last log line (plot path appended)."""
        return ""

    def model_states(self) -> dict[str, dict[str, int]]:
        """Bytes of parameters, gradients and optimizer states of every model on this rank
        (complete once the optimizer has stepped: Adam's moments are made on the first step)."""
        return {self.MODEL_NAME: model_state_bytes(self.model, self.ddp, self.optimizer)}

    # --- setup -----------------------------------------------------------------------------
    def _plan(self):
        plan = self.run_dir.prepare(newest_checkpoint)
        if plan.resume_from is not None:
            self._check_resumable(plan.resume_from)
        return plan

    def _check_inputs_apart_from_output(self, removes: bool) -> None:
        """output_dir is no input and lies inside none; with --overwrite (and --resume auto
        without a checkpoint), which remove the old run's files, it holds none either."""
        for name, value in self.inputs().items():
            if not isinstance(value, str) or value == "policy":
                continue
            how = overlap(self.out, value)
            if how in ("is", "lies inside"):
                check_apart("output_dir", self.out, {name: value})
            if how == "contains" and removes:
                raise ConfigError(f"{name}={value} lies inside output_dir {self.out}, whose "
                                  "previous run's files --overwrite / --resume auto may remove: "
                                  "copy it elsewhere or choose another output_dir")

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device = self.runtime.device
        self.dtype = self._dtype()
        self.model = self.build_model()
        self.ddp = wrap_ddp(self.model, t.use_distributed_optimizer)
        self.optimizer = build_optimizer(self.ddp, self.optimizer_settings(t.lr, t.min_lr))
        self.scheduler = build_scheduler(self.optimizer, t.lr, t.min_lr, t.warmup_steps,
                                         self.total_steps, t.weight_decay)
        self.step = 0
        self.last_updates = 0  # optimizer updates in the last step (skipped_steps counts them)
        self.skipped_steps = SkippedSteps(
            0 if self.dtype == torch.float16 else t.max_skipped_steps)
        self.build()
        if self.resume_from is not None:
            self._resume(self.resume_from)
        self.metrics = None
        if self.runtime.is_main:
            save_yaml(to_dict(cfg), self.out / "config.yaml")
            self.metrics = MetricsLogger(self.out, self.total_steps, cfg.log.tensorboard,
                                         cfg.log.wandb_project, to_dict(cfg), self.step,
                                         view=self.VIEW)

    def _dtype(self) -> torch.dtype:
        name = self.cfg.train.dtype
        if name == "auto":
            name = "bf16" if self.device.type == "cuda" else "fp32"
        return dtype_from_name(name)

    def _precision(self, model):
        return to_precision(model, self.dtype, self.device)

    def optimizer_settings(self, lr: float, min_lr: float) -> OptimizerSettings:
        t = self.cfg.train
        return OptimizerSettings(
            lr=lr, min_lr=min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
            use_distributed_optimizer=t.use_distributed_optimizer)

    # --- checkpoints -----------------------------------------------------------------------
    def _check_resumable(self, path: Path) -> None:
        """Everything about the checkpoint that can be checked before any model is built: its
        files, its models against this run's, the optimizer type."""
        state = check_training_checkpoint(path, self.trained.config, self.extra_configs() or None)
        distributed = state.get("use_distributed_optimizer")  # absent: written before it was kept
        if distributed is not None and distributed != self.cfg.train.use_distributed_optimizer:
            raise ConfigError(f"{path} was saved with train.use_distributed_optimizer="
                              f"{str(distributed).lower()}: resume with the same setting (the "
                              "two optimizers store their state differently)")

    def _resume(self, path: Path) -> None:
        # The run's config wins over the checkpoint's (more steps, another LR or betas): the
        # param groups' settings are put back after the load, and the schedule rebuilt from it
        # at the saved step.
        extras = self.extra_models()
        optimizers = [self.optimizer] + [extra.optimizer for extra in extras]
        mine = [optimizer_settings(optimizer) for optimizer in optimizers]
        state = load_training_checkpoint(path, self.ddp, self.optimizer, None, extras)
        for optimizer, settings in zip(optimizers, mine):
            apply_optimizer_settings(optimizer, settings)
        changed = restore_schedule(self.scheduler, state["scheduler"]) + self.restore(state)
        self.step = state["step"]
        log.info("resumed from %s at step %d of %d", path, self.step, self.total_steps)
        if changed and self.runtime.is_main:
            log.info("resume: the LR schedule follows this run's config, not the checkpoint's: "
                     "%s", "; ".join(changed))

    def save(self) -> Path:
        self.heartbeat.enter("save", self.step)
        state = {"step": self.step, "loader": self.data_position(),
                 "use_distributed_optimizer": self.cfg.train.use_distributed_optimizer,
                 **self.extra_state()}
        meta = dataclasses.replace(self.trained.meta, dtype=DTYPE_NAMES[self.dtype])
        return save_training_checkpoint(
            self.out, self.step, self.ddp, self.optimizer, self.scheduler, state, meta,
            self.trained.config, self.trained.hf_config, self.tokenizer,
            self.cfg.checkpoint.keep_last, extra_files=self._extra_files(),
            extra_models=self.extra_models())

    def _extra_files(self) -> list[Path]:
        """Files of the source checkpoint that exports need (extra EOS ids live there)."""
        load = self.cfg.policy.load
        path = Path(load) / GENERATION_CONFIG if load else None
        return [path] if path is not None and path.is_file() else []

    # --- the loop --------------------------------------------------------------------------
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

    def announce(self) -> None:
        """The run's first log line (rank 0)."""

    def _run(self, stop_after: int | None) -> list[dict]:
        history = []
        every = self.cfg.checkpoint.save_every
        end = self.total_steps if stop_after is None else min(self.total_steps,
                                                              self.step + stop_after)
        if self.runtime.is_main:
            self.announce()
        if self.has_eval and self.step == 0:
            self._log_eval(self.evaluate())  # the starting point
        while self.step < end:
            self.samples = None
            metrics = self.train_step()
            if not history and self.runtime.is_main:
                log.info(format_states(self.model_states()))
            if self._eval_due():
                result = self.evaluate()
                metrics.update(result)
                self._log_eval(result)
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
                line = self.summary(self.metrics.history[0], self.metrics.history[-1])
                log.info("%s%s", line, f"; plot: {plot}" if plot else "")
        if final is not None and self.cfg.checkpoint.export_hf and self.runtime.is_main:
            export_hf(final, self.out / HF_DIR)  # last: the run's own outputs are all written
        return history

    def _log_eval(self, result: dict) -> None:
        if self.metrics is not None:
            self.metrics.log_eval(self.step, result)

    def _eval_due(self) -> bool:
        every = self.cfg.log.eval_every
        return self.has_eval and (
            self.step == self.total_steps or (every > 0 and self.step % every == 0))

    def close(self) -> None:
        self.heartbeat.close()
        shutdown()
        self.run_dir.close()


def resolve_loads(cfg, settings) -> None:
    """Settings such as policy.load may name a run directory, its checkpoints/ or
    checkpoints/latest: each becomes the newest complete checkpoint there (logged)."""
    for setting in settings:
        section, key = setting.split(".")
        part = getattr(cfg, section)
        value = getattr(part, key)
        if isinstance(value, str) and value != "policy" and Path(value).exists():
            # (a missing path gets the config check's error, with its hint for that setting)
            setattr(part, key, str(resolve_checkpoint(value, setting)))
