"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits for a contiguous slice of the (padded) vocabulary. Three
all-reduces over the tp group (max, sum of exponentials, the target's logit) give exact
log-softmax values; padded vocab ids (>= the true vocab size) get zero probability.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_group(group):
    if group is not None:
        return group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _masked_local_logits(logits: torch.Tensor, true_vocab_size: int, group) -> tuple:
    """fp32 copy of this rank's logits with padded vocab ids at the lowest finite value (their
    probability is exactly 0, and 0 x logit stays 0 in the entropy), and the slice's start id."""
    local_vocab = logits.size(-1)
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    start = rank * local_vocab
    logits = logits.to(torch.float32, copy=True)  # the statistics below work in place
    if start + local_vocab > true_vocab_size:
        ids = torch.arange(start, start + local_vocab, device=logits.device)
        logits.masked_fill_(ids >= true_vocab_size, torch.finfo(torch.float32).min)
    return logits, start


class _VocabParallelLogProbs(torch.autograd.Function):
    """log softmax(logits)[target] with logits sharded on the last dim; backward: onehot - softmax."""

    @staticmethod
    def forward(ctx, logits, target, true_vocab_size, group, want_entropy):
        logits, start = _masked_local_logits(logits, true_vocab_size, group)
        local_vocab = logits.size(-1)

        logits_max = logits.max(dim=-1).values
        _all_reduce(logits_max, group, dist.ReduceOp.MAX)
        logits.sub_(logits_max.unsqueeze(-1))  # shifted logits, in place to save memory

        in_slice = (target >= start) & (target < start + local_vocab)
        local_target = (target - start).clamp(0, local_vocab - 1)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(in_slice, target_logit, torch.zeros_like(target_logit))
        _all_reduce(target_logit, group)

        probs = logits.exp()  # padded ids: exp(lowest - max) = 0
        sum_exp = probs.sum(dim=-1)
        _all_reduce(sum_exp, group)
        log_z = sum_exp.log()
        log_probs = target_logit - log_z

        entropy = None
        if want_entropy:
            # H = log Z - sum_v p_v * shifted_v (a batched dot product: no vocab-sized temporary)
            weighted = torch.einsum("...v,...v->...", probs, logits)
            _all_reduce(weighted, group)
            entropy = log_z - weighted / sum_exp

        probs.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(probs, local_target, in_slice)
        ctx.mark_non_differentiable(*(t for t in (entropy,) if t is not None))
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        softmax, local_target, in_slice = ctx.saved_tensors
        grad = softmax.neg_()
        onehot = in_slice.to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), onehot)
        grad.mul_(grad_log_probs.unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, true_vocab_size: int,
                             group=None, with_entropy: bool = False):
    """Log-prob of ``target`` under ``logits`` (sharded on the last dim over ``group``).

    Args:
        logits: [..., vocab/tp] this rank's slice of the padded vocabulary (any float dtype).
        target: [...] global token ids (< true_vocab_size).
        true_vocab_size: ids at or beyond it are vocab padding and get probability 0.
        group: the tensor-parallel group (default: megatron's).
        with_entropy: also return the per-position entropy (a metric: no gradient flows through it).

    Returns: log_probs [...] fp32 (differentiable w.r.t. logits), and entropy [...] or None.
    """
    group = _tp_group(group) if dist.is_initialized() else None
    log_probs, entropy = _VocabParallelLogProbs.apply(
        logits, target, true_vocab_size, group, with_entropy
    )
    return (log_probs, entropy) if with_entropy else log_probs


def frame_log_probs(output: torch.Tensor, batch: dict, true_vocab_size: int,
                    with_entropy: bool = False):
    """A training micro-batch's per-token log-probs (and entropy) in its loss mask's frame
    [rows, seq - 1] (position t predicts token t + 1).

    ``output``: the policy's logits at every position [rows, seq, vocab/tp], or, when the batch
    has ``logit_positions`` [n, 2] ((row, position) pairs; engine.output_layer_at), only there
    [1, n, vocab/tp]; then the frame is zero elsewhere (the loss mask is too).
    """
    ids = batch["input_ids"]
    positions = batch.get("logit_positions")
    if positions is None:
        return vocab_parallel_log_probs(output[:, :-1], ids[:, 1:], true_vocab_size,
                                        with_entropy=with_entropy)
    rows, cols = positions[:, 0], positions[:, 1]
    picked = vocab_parallel_log_probs(output[0], ids[rows, cols + 1], true_vocab_size,
                                      with_entropy=with_entropy)
    frame = batch["loss_mask"].shape

    def in_frame(values):
        return values.new_zeros(frame).index_put((rows, cols), values)

    return tuple(map(in_frame, picked)) if with_entropy else in_frame(picked)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is set (padded rows excluded)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
