"""What SFT and reward-model training share on top of the training core: a step is one global
batch of rows from the data file (each data-parallel rank its share, in micro-batches through
megatron's schedule) and one optimizer update; an evaluation is the same loss over the held-out
rows, forward only. A kind says what a row is, how rows become micro-batches, and its loss:

  load(path)               the file's rows (one-line errors for bad rows)
  micro_batches(rows)      -> (batches, width); rows with weight 0 are fillers (evaluation)
  loss_terms(out, batch)   -> (loss sum, normalizer, STATS sums but the last, "processed": the
                              tokens read, which the step adds): megatron divides the gradient
                              by the global normalizer, so the loss is exact at any layout
  describe(sums)           the named metrics of STATS' global sums (train and eval alike)
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from ..data.loader import PromptLoader, held_out, share_of
from ..data.tokenizer import pad_id
from .core import TrainingRun
from .engine import forward_only, update
from .finetune_config import check_finetune_config
from .policy import check_trainable, policy_tokenizer
from .step_metrics import peak_memory_gib

log = logging.getLogger(__name__)


class SupervisedRun(TrainingRun):
    STATS: tuple = ()
    UNIT = "rows"  # what a row is called in logs and errors (rows, pairs)

    def setup(self) -> None:
        cfg = self.cfg
        check_finetune_config(cfg, self.launch.world_size)
        self.trained = self.describe_model()
        self.tokenizer = policy_tokenizer(cfg)
        d = cfg.data
        self.max_length = d.max_length or self.trained.config.max_position_embeddings
        check_trainable(cfg, self.trained.config, self.tokenizer, self.max_length,
                        f"data.max_length {self.max_length}")
        self.loader = PromptLoader(self.load(d.path), self.max_length,
                                   cfg.train.global_batch_size, cfg.train.seed, d.shuffle,
                                   self.UNIT, "data.max_length")
        self.eval_rows = self._eval_rows()
        self.has_eval = bool(self.eval_rows)
        self.total_steps = self.planned_steps()
        self.pad = pad_id(self.tokenizer)

    def _eval_rows(self) -> list:
        path = self.cfg.data.eval_path
        if path is None:
            return []
        return held_out(self.load(path), self.max_length, path, self.UNIT, "data.max_length")

    def inputs(self) -> dict:
        c = self.cfg
        return {"policy.load": c.policy.load, "data.path": c.data.path,
                "data.eval_path": c.data.eval_path}

    def announce(self) -> None:
        log.info("%s: training %s for %d steps (%d %s per step, %d dropped as too long) -> %s",
                 self.KIND, self.trained.meta.architecture, self.total_steps,
                 self.cfg.train.global_batch_size, self.UNIT, self.loader.dropped, self.out)

    # --- the kind's part ------------------------------------------------------------------------
    KIND = ""

    def describe_model(self):
        raise NotImplementedError

    def load(self, path) -> list:
        raise NotImplementedError

    def micro_batches(self, rows: list, weights: list[float]) -> tuple[list[dict], int]:
        raise NotImplementedError

    def loss_terms(self, output, batch) -> tuple:
        raise NotImplementedError

    def describe(self, sums: dict) -> dict:
        raise NotImplementedError

    def tokens_in(self, row) -> int:
        return len(row.ids)

    # --- one step ---------------------------------------------------------------------------
    def _loss(self, output, batch):
        loss_sum, normalizer, stats = self.loss_terms(output, batch)
        self._sums += stats.detach().double()  # on the device: no host sync per micro-batch
        return loss_sum, normalizer.round().to(torch.int), {}

    def _mine(self, rows: list) -> list:
        from megatron.core import parallel_state as ps

        return share_of(rows, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())

    def _global_sums(self) -> dict:
        """STATS summed over every rank (the last stage's tp rank 0 holds each batch's)."""
        from megatron.core import parallel_state as ps

        mine = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage()
        sums = self._sums if mine else torch.zeros_like(self._sums)
        dist.all_reduce(sums)
        return dict(zip(self.STATS, sums.tolist()))

    def train_step(self) -> dict:
        start = time.time()
        lr = self.optimizer.param_groups[0]["lr"]  # the scheduler moves it on at the step's end
        rows = [row for _, row in self._mine(self.loader.next_batch())]
        batches, width = self.micro_batches(rows, [1.0] * len(rows))
        self._sums = torch.zeros(len(self.STATS), dtype=torch.float64, device=self.device)
        self.heartbeat.enter("update", self.step + 1)
        applied, grad_norm = update(self.ddp, self.optimizer, batches, self._loss, width,
                                    self.cfg.train.micro_batch_size,
                                    self.dtype == torch.float16)
        if applied:
            self.scheduler.step(increment=1)
        else:
            log.warning("step %d: non-finite loss or gradient: the update was skipped, the "
                        "weights unchanged", self.step + 1)
        self.step, self.last_updates = self.step + 1, 1
        # every token the step read (prompts too): its throughput
        self._sums[self.STATS.index("processed")] += sum(self.tokens_in(row) for row in rows)
        sums = self._global_sums()
        spans = torch.tensor([time.time() - start, peak_memory_gib(self.device)],
                             dtype=torch.float64, device=self.device)
        dist.all_reduce(spans, op=dist.ReduceOp.MAX)
        seconds, peak = spans.tolist()
        return {"step": self.step, **self.describe(sums),
                "grad_norm": grad_norm if applied else float("nan"), "lr": lr,
                "skipped": int(not applied), "time/step": seconds,
                "tokens_per_second": sums["processed"] / max(seconds, 1e-9),
                "memory/peak_gib": peak, "epoch": self.loader.state.epoch}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The loss (and the kind's metrics) over every held-out row, forward only. Every rank
        runs as many micro-batches (fillers of weight 0 even them out: expert-parallel layers
        exchange tokens between data-parallel ranks)."""
        from megatron.core import parallel_state as ps

        self.heartbeat.enter("evaluate", self.step)
        dp = ps.get_data_parallel_world_size()
        rows = self._mine(self.eval_rows)
        share = -(-len(self.eval_rows) // dp)
        weights = [1.0] * len(rows) + [0.0] * (share - len(rows))
        rows += [self.eval_rows[0]] * (share - len(rows))
        self._sums = torch.zeros(len(self.STATS), dtype=torch.float64, device=self.device)
        mbs = self.cfg.train.micro_batch_size
        # in slices of a training step's size: the memory a step needs, and no more
        per_call = self.cfg.train.global_batch_size // dp
        for chunk in self.ddp:
            chunk.eval()
        for start in range(0, share, per_call):
            batches, width = self.micro_batches(rows[start:start + per_call],
                                                weights[start:start + per_call])
            forward_only(self.ddp, batches, lambda out, batch: self._loss(out, batch), width,
                         mbs)
        return {f"eval/{k}": v for k, v in self.describe(self._global_sums()).items()} | {
            f"eval/{self.UNIT}": len(self.eval_rows)}

    def summary(self, first: dict, last: dict) -> str:
        return (f"{self.KIND}: loss {first['loss']:.4f} at step {first['step']} -> "
                f"{last['loss']:.4f} at step {last['step']}")
