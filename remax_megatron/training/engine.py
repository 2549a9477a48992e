"""Megatron training plumbing in one place: DDP wrapping, the optimizer, and one
forward/backward over micro-batches through ``get_forward_backward_func`` (pipeline aware).

Losses plug in as ``loss_fn(output_tensor, batch) -> (loss_sum, normalizer, metrics)``: megatron
sums ``loss_sum`` and ``normalizer`` over micro-batches and data-parallel ranks and divides the
gradients by the total normalizer (``calculate_per_token_loss``), so a loss normalized per token,
per sequence or per anything is exact whatever the micro-batching and dp size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from ..config_io import ConfigError
from ..models.builder import model_chunks, unwrap


@dataclass
class OptimizerSettings:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


def to_precision(model, dtype: torch.dtype, device: torch.device):
    """``model`` on ``device`` in ``dtype``: fp32 as it is; bf16 / fp16 (on a GPU, and bf16 on a
    CPU with bf16 kernels) through megatron's Float16Module, whose optimizer keeps fp32 main
    parameters. One path for both devices: CI exercises the precision path GPU users run."""
    model = model.to(dtype)  # before the move: never the fp32 model on the GPU
    config = model.config
    config.params_dtype = dtype
    config.pipeline_dtype = dtype  # megatron sizes pipeline receive buffers by it
    config.bf16 = dtype == torch.bfloat16
    config.fp16 = dtype == torch.float16
    model = model.to(device)
    if dtype != torch.float32:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    return model


def wrap_ddp(model, use_distributed_optimizer: bool = False, grad_reduce_in_fp32: bool = True):
    """Megatron DDP around ``model`` (gradients in contiguous fp32 buffers, reduced at finalize);
    around each chunk of a list of virtual pipeline chunks (then a list)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    ddps = []
    for index, chunk in enumerate(model_chunks(model)):
        # Our losses return (sum, normalizer): megatron divides gradients by the global
        # normalizer. DDP reads this flag when it is built (it then skips its own 1/dp scaling).
        chunk.config.calculate_per_token_loss = True
        ddps.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config,
                                            module=chunk, disable_bucketing=index > 0))
    no_sync = ddps[0].no_sync if len(ddps) == 1 else [ddp.no_sync for ddp in ddps]
    for ddp in ddps:
        ddp.config.finalize_model_grads_func = finalize_model_grads
        ddp.config.no_sync_func = no_sync
    return ddps if isinstance(model, (list, tuple)) else ddps[0]


def build_optimizer(ddp_model, settings: OptimizerSettings):
    """Megatron's Adam (plain or distributed), with gradient clipping and fp32 main params."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = unwrap(ddp_model).config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks(ddp_model))
    for chunk in model_chunks(ddp_model):
        chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def _forward_step(loss_fn: Callable, before_forward, data_iterator, model):
    batch = next(data_iterator)
    if before_forward is not None:
        before_forward(batch)
    with output_layer_at(model, batch.get("logit_positions")):
        output = model(batch["input_ids"], batch["position_ids"], batch.get("attention_mask"))
    return output, partial(loss_fn, batch=batch)


@contextlib.contextmanager
def output_layer_at(model, positions: torch.Tensor | None):
    """Run the policy's output layer only at ``positions`` [n, 2] ((row, position) pairs): the
    model then returns logits [1, n, vocab/tp] instead of [rows, seq, vocab/tp]. A prompt
    position's logits are never read by a loss, and the vocabulary projection (with its
    vocab-sized fp32 buffers in the log-softmax) is the largest single cost of a small model's
    step. Models without a vocabulary projection (reward, critic) and stages without the output
    layer run as they are."""
    layer = getattr(unwrap(model), "output_layer", None)
    if positions is None or layer is None:
        yield
        return
    sequence_parallel = layer.sequence_parallel

    def select(module, args, kwargs):
        hidden = args[0]  # [s, b, h] (s / tp under sequence parallelism)
        if sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            # the layer below, now told it is not sequence parallel, all-reduces the input's
            # gradient itself: this gather's backward must only split it (no reduce-scatter)
            hidden = gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=module.tp_group)
            module.sequence_parallel = False
        picked = hidden[positions[:, 1], positions[:, 0]].unsqueeze(1)  # [n, 1, h]
        return (picked, *args[1:]), kwargs

    def restore(module, args, output):
        module.sequence_parallel = sequence_parallel

    handles = [layer.register_forward_pre_hook(select, with_kwargs=True),
               layer.register_forward_hook(restore)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        layer.sequence_parallel = sequence_parallel


def forward_backward(model, batches: Iterable[dict], loss_fn: Callable, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False,
                     before_forward: Callable | None = None) -> list[dict]:
    """Run every micro-batch in ``batches`` through megatron's schedule.

    Each batch holds ``input_ids`` and ``position_ids`` [mbs, seq] (the same on every stage;
    ``seq`` may differ between micro-batches, up to ``seq_length``), optionally
    ``logit_positions`` (see output_layer_at), and whatever ``loss_fn`` reads. ``model``: one
    model, or a list of virtual pipeline chunks (megatron's interleaved schedule).
    ``before_forward(batch)`` runs before each micro-batch's forward (on every stage).
    Returns the metrics dicts ``loss_fn`` produced (last pipeline stage; empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    chunks = model_chunks(model)
    # micro-batches trimmed to their own longest row: pipeline stages then exchange each
    # activation's shape before the activation (megatron's variable sequence lengths)
    variable = len({b["input_ids"].shape for b in batches}) > 1
    for chunk in chunks:
        chunk.config.variable_seq_lengths = variable
        if not forward_only:
            chunk.zero_grad_buffer()
    if len(chunks) == 1:
        data, forward_backward_func = iter(batches), get_forward_backward_func()
    else:
        pp = unwrap(chunks[0]).pg_collection.pp.size()
        _interleave(chunks, len(batches), pp)
        forward_backward_func = get_forward_backward_func(pp_size=pp, vp_size=len(chunks))
        data = [iter(batches) for _ in chunks]  # every chunk reads each micro-batch once
    return forward_backward_func(
        forward_step_func=partial(_forward_step, loss_fn, before_forward),
        data_iterator=data,
        model=chunks,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def _interleave(chunks: list, micro_batches: int, pp: int) -> None:
    """Settings of megatron's interleaved schedule for this call: it runs micro-batches in
    groups of pp per chunk (depth first); a count that pp does not divide runs as one group."""
    if micro_batches < pp:
        raise ConfigError(
            f"virtual pipeline stages need at least pp={pp} micro-batches per update, got "
            f"{micro_batches}: lower train.micro_batch_size or raise train.global_batch_size")
    group = pp if micro_batches % pp == 0 else micro_batches
    for chunk in chunks:
        chunk.config.microbatch_group_size_per_vp_stage = group
        # Megatron-LM's interleaved default: forward and backward messages in separate calls.
        # Batched, both directions go between the same two ranks at pp=2 in one call (and a
        # forward activation could be matched with a backward gradient)
        chunk.config.overlap_p2p_comm = True
        chunk.config.batch_p2p_comm = False
        if dist.get_backend(unwrap(chunk).pg_collection.pp) == "gloo":
            # the schedule frees a sent activation's storage before an overlapped send has
            # read it; gloo's send reads the CPU memory itself (NCCL keeps it alive)
            chunk.config.deallocate_pipeline_outputs = False



def forward_only(model, batches: list[dict], record: Callable, seq_length: int,
                 micro_batch_size: int, before_forward: Callable | None = None) -> None:
    """One no-grad forward of every micro-batch; ``record(output, batch)`` stores what it needs
    in ``batch`` (last pipeline stage: where the output is)."""

    def capture(output, batch):
        record(output, batch)
        return output.sum() * 0, torch.tensor(1, dtype=torch.int), {}

    with torch.no_grad():
        for chunk in model_chunks(model):
            chunk.config.calculate_per_token_loss = True
        forward_backward(model, batches, capture, seq_length=seq_length,
                         micro_batch_size=micro_batch_size, forward_only=True,
                         before_forward=before_forward)


def grads_finite(ddp_model) -> bool:
    """Every gradient of every rank finite (one all-reduce)."""
    buffers = [buffer for chunk in model_chunks(ddp_model) for buffer in chunk.buffers]
    bad = torch.zeros((), device=buffers[0].grad_data.device)
    for buffer in buffers:
        if not torch.isfinite(buffer.grad_data).all():
            bad.fill_(1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def update(ddp_model, optimizer, batches: list[dict], loss_fn: Callable, seq_length: int,
           micro_batch_size: int, fp16: bool = False,
           before_forward: Callable | None = None) -> tuple[bool, float]:
    """Forward/backward over ``batches`` and one optimizer step, unless a gradient is non-finite
    somewhere (then the gradients are dropped and the weights stay as they were; under fp16
    megatron's loss scaler makes that call). Returns (applied, grad norm)."""
    chunks = model_chunks(ddp_model)
    for chunk in chunks:
        chunk.train()
    # After a step megatron's fp32 optimizer leaves param.grad aliased to the DDP grad buffer;
    # the next backward would then add the first micro-batch's gradient twice.
    optimizer.zero_grad()
    forward_backward(ddp_model, batches, loss_fn, seq_length=seq_length,
                     micro_batch_size=micro_batch_size, before_forward=before_forward)
    applied, grad_norm = False, float("nan")
    if fp16 or grads_finite(ddp_model):
        applied, grad_norm, _ = optimizer.step()
    if not applied:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    return applied, float(grad_norm) if grad_norm is not None else float("nan")


def build_scheduler(optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                    weight_decay: float):
    """Linear warmup then cosine decay to ``min_lr`` at ``total_steps`` (megatron's scheduler)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup_steps else lr, max_lr=lr, min_lr=min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=max(total_steps, warmup_steps + 1),
        lr_decay_style="cosine", start_wd=weight_decay, end_wd=weight_decay,
        wd_incr_steps=total_steps, wd_incr_style="constant")


# the schedule's settings as megatron stores them, with the config option each comes from
SCHEDULE_SETTINGS = {"max_lr": "lr", "min_lr": "min_lr", "lr_warmup_steps": "warmup_steps",
                     "lr_decay_steps": "decay steps (train.steps or epochs)",
                     "start_wd": "weight_decay"}


def restore_schedule(scheduler, saved: dict) -> list[str]:
    """Continue ``scheduler``, built from THIS run's config, at the saved step count, so that a
    resume with more steps or another LR follows the new schedule (megatron's own
    load_state_dict keeps the checkpoint's settings). Returns the settings that changed."""
    changed = [f"{label} {saved[key]:g} -> {getattr(scheduler, key):g}"
               for key, label in SCHEDULE_SETTINGS.items()
               if key in saved and saved[key] != getattr(scheduler, key)]
    scheduler.num_steps = 0
    scheduler.step(increment=saved["num_steps"])
    return changed


def optimizer_settings(optimizer) -> list[dict]:
    """Each param group's settings (LR bounds, weight decay, betas, eps; not its parameters or
    Adam's step): a resume puts back the run's own after loading the checkpoint, whose
    param groups would otherwise bring the old run's LR and betas with them."""
    return [{k: v for k, v in group.items() if k not in ("params", "step")}
            for group in optimizer.param_groups]


def apply_optimizer_settings(optimizer, settings: list[dict]) -> None:
    for group, mine in zip(optimizer.param_groups, settings, strict=True):
        group.update(mine)


def _torch_adam_distributed(optimizer) -> list:
    """The inner torch optimizers of megatron distributed optimizers running torch's Adam (no
    Transformer Engine or apex: every CPU run), which need the two workarounds below."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []  # TE's / apex's Adam: megatron's own path, nothing to work around
    return [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(inner, distrib_optimizer.DistributedOptimizer)]


def prime_optimizer_state(optimizer) -> None:
    """Give every parameter an Adam state with a step before a distributed-optimizer checkpoint
    is saved or loaded: megatron builds that state dict from the live state and, with torch's
    Adam, asserts one common 'step', which does not exist before the first applied update. The
    zeros are what a first Adam step would create; a load overwrites them."""
    for torch_optimizer in _torch_adam_distributed(optimizer):
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                state.setdefault("step", torch.zeros((), dtype=torch.float32))


def restore_adam_steps(optimizer, opt_state) -> None:
    """megatron's distributed optimizer with torch's Adam saves Adam's step in its param_groups,
    but on load copies the live (primed, zero) per-parameter step over it and leaves one tensor
    shared by every parameter, which Adam would advance once per parameter per step. Give each
    parameter its own tensor holding the saved step."""
    inners = _torch_adam_distributed(optimizer)
    if not inners:
        return
    # a chain of one saves its optimizer's state unnested; longer chains by index
    saved = [opt_state] if len(inners) == 1 else [v for _, v in sorted(opt_state.items())]
    for torch_optimizer, state in zip(inners, saved):
        inner_state = state.get("optimizer") if isinstance(state, dict) else None
        groups = inner_state.get("param_groups", []) if isinstance(inner_state, dict) else []
        steps = {group["step"] for group in groups if "step" in group}
        if len(steps) != 1:
            continue  # no step in the param groups: torch's own state carried it
        step = float(next(iter(steps)))
        for param_state in torch_optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = torch.full_like(param_state["step"], step)
