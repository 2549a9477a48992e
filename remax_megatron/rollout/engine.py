"""KV-cached generation from the training model itself, under tensor, pipeline and data parallelism.

The decode loop walks megatron-core's own layers (embedding, each layer's norms, QKV and output
projections, MLP, final norm, output layer) on the training weights (no second copy); for the
standard layers it does their math directly, tensor-parallel reductions included, without
megatron's per-call plumbing (see forward.py), and attention against the cache is ours. That lets
each row carry its own positions (left- or right-padded prompts get exactly transformers'
positions, RoPE included) and lets the k continuations of a prompt share its prefill (see
kv_cache).

Pipeline stages pass hidden states point to point; the last stage gathers the vocab-parallel
logits, chooses tokens and broadcasts them to every stage. Data-parallel ranks run their own
prompts independently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from ..config_io import ConfigError
from ..models.builder import model_chunks, unwrap
from ..ops.padding import position_ids
from ..runtime import cpu_compat
from .forward import StageForward
from .kv_cache import SharedPrefixKVCache
from .sampling import GREEDY, SamplingParams, choose, row_uniforms
from .static_decode import StaticDecode, static_decode_applies

log = logging.getLogger(__name__)

# Decode steps between checks that every row has finished (a host sync on a GPU: the check waits
# for the step's kernels). Rows that finished early only produce padding meanwhile, and the output
# is cut at the longest row, so the result does not depend on it; on the CPU a check costs nothing.
FINISHED_CHECK_EVERY = {"cuda": 8}
# devices whose decode steps run on static buffers (static_decode.py); captured as a CUDA graph
# on a GPU. The CPU runs the eager steps (no launch overhead to save; tests add it here).
STATIC_DECODE_DEVICES = {"cuda"}


@dataclass
class GenerationOutput:
    """R = B * len(continuations) rows, prompt-major: row r continues prompt r // k."""

    tokens: torch.Tensor  # [R, T] generated ids (EOS included when produced), pad after the end
    response_mask: torch.Tensor  # [R, T] bool
    lengths: torch.Tensor  # [R] number of generated tokens
    finish_reason: list  # "eos" | "length" per row
    # [R, T] log softmax(logits)[token] under the policy (unfiltered; at T=1, or with
    # tempered_log_probs at the row's sampling temperature)
    log_probs: torch.Tensor
    prompt_index: torch.Tensor  # [R]
    continuation: torch.Tensor  # [R] index into ``continuations``


def _check_lengths(prompt_mask: torch.Tensor, max_new_tokens: int, max_positions: int) -> None:
    longest = int(prompt_mask.sum(-1).max()) if prompt_mask.numel() else 0
    if longest + max_new_tokens > max_positions:
        raise ConfigError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"{max_positions} positions: shorten the prompts or lower max_new_tokens")


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             continuations: Sequence[SamplingParams] = (GREEDY,), max_new_tokens: int = 64,
             eos_token_ids: Sequence[int] = (), vocab_size: int | None = None, seed: int = 0,
             sample_ids: torch.Tensor | None = None, pad_token_id: int = 0,
             pipeline_micro_batches: int = 0, cuda_graph: bool = True,
             tempered_log_probs: bool = False, routes=None) -> GenerationOutput:
    """Generate ``len(continuations)`` continuations of every prompt, the prompt prefilled once.

    Args:
        model: the (tp/pp-sharded) policy, possibly wrapped in megatron DDP / Float16Module;
            or a list of its virtual pipeline chunks.
        prompt_ids, prompt_mask: [B, P]; rows may be left- or right-padded (mask 0 = padding).
        continuations: one SamplingParams per continuation of each prompt, e.g.
            (GREEDY, SamplingParams(temperature=1.0, top_p=0.9)) for ReMax.
        eos_token_ids: a row stops after producing any of them (the EOS is kept in the output).
        vocab_size: the true vocabulary; padded ids beyond it are never produced.
        seed, sample_ids: a sampled row draws from a generator seeded by (seed, sample_ids[b],
            its index among the sampled continuations): reproducible and independent of
            batching and layout.
        pipeline_micro_batches: under pipeline parallelism, split the prompts into this many
            groups that follow each other through the stages (stage 1 works on the first group
            while stage 0 starts the second), for the prefill and every decode step. That pays
            where a stage's forward is compute-bound (prefill, large batches); a small-batch
            decode step is bound by reading the weights, which each group repeats. 0 (auto):
            the prefill in 2 x pp groups, decoding the whole batch at once. The tokens do not
            depend on it.
        cuda_graph: on a GPU, capture the decode step once as a CUDA graph and replay it for
            every token (one process per pipeline and tensor-parallel group, the whole batch
            decoding at once; see static_decode.py). The same tokens up to float rounding
            (its attention runs over the whole masked cache).
        tempered_log_probs: record each sampled row's log-probs under softmax(logits / its
            temperature), the distribution it was drawn from before top-k / top-p (what the
            trainer trains with rollout.tempered_log_probs), instead of softmax(logits).
        routes: a mixture-of-experts policy's RolloutRoutes (rollout/routes.py), told which rows
            each forward computes, to record every token's experts.
    """
    gpt = unwrap(model)
    cfg = gpt.config
    vocab_size = vocab_size or gpt.model_config.vocab_size
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    _check_lengths(prompt_mask, max_new_tokens, gpt.max_sequence_length)
    if pipeline_micro_batches < 0:
        raise ConfigError(f"pipeline_micro_batches={pipeline_micro_batches} must be >= 0 "
                          "(0: automatic)")
    chunks = model_chunks(model)
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        with cpu_compat.suspended():  # no per-call interception in the decode loop (CPU runs)
            return _generate(model, prompt_ids, prompt_mask, list(continuations),
                             max_new_tokens, set(int(e) for e in eos_token_ids), vocab_size,
                             seed, sample_ids, pad_token_id, cfg, pipeline_micro_batches,
                             cuda_graph and routes is None, tempered_log_probs, routes)
    finally:
        for chunk, mode in zip(chunks, was_training):
            chunk.train(mode)


def _generate(model, prompt_ids, prompt_mask, continuations, max_new_tokens, eos, vocab_size, seed,
              sample_ids, pad_token_id, cfg, micro_batches, cuda_graph,
              tempered_log_probs, routes=None) -> GenerationOutput:
    fwd = StageForward(model)
    pipe = fwd.pipe
    device = fwd.device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device).long()
    batch, k = prompt_ids.size(0), len(continuations)
    rows = batch * k
    tp_size = fwd.tp_group.size()
    prefill_groups, decode_groups = _pipeline_groups(batch, pipe.size, micro_batches)
    static = (cuda_graph and rows > 0 and max_new_tokens > 1
              and device.type in STATIC_DECODE_DEVICES
              and static_decode_applies(fwd, whole_batch=len(decode_groups) == 1))
    cache = SharedPrefixKVCache(
        len(fwd.layers), prompt_mask, k, max_new_tokens,
        groups=cfg.num_query_groups // tp_size, head_dim=cfg.kv_channels, dtype=fwd.dtype,
        static=static)
    decode_step = (StaticDecode(fwd, cache, rows, vocab_size, capture=device.type == "cuda")
                   if static else None)

    prompt_len = prompt_mask.sum(-1)
    fwd.reserve_positions(int(prompt_len.max()) + max_new_tokens if batch else 0)
    last_real = torch.where(prompt_mask.bool(), torch.arange(prompt_mask.size(1), device=device),
                            torch.zeros_like(prompt_mask)).max(-1).values
    positions = position_ids(prompt_mask)
    # one prefill per prompt serves all k continuations of it
    def prefill(g: slice):
        if routes is not None:
            routes.prefill(g)
        return fwd.hidden(prompt_ids[g], positions[g], _prefill_attend(cache, g),
                          pick=last_real[g])

    logits = _last_stage_logits(fwd, vocab_size, [prefill(g) for g in prefill_groups])
    if logits is not None:
        logits = logits.repeat_interleave(k, dim=0)

    ids = list(range(batch)) if sample_ids is None else sample_ids.tolist()
    streams = _sampling_streams(continuations)
    uniforms = row_uniforms(seed, [ids[r // k] for r in range(rows)],
                            [streams[r % k] for r in range(rows)], max_new_tokens).to(device)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    log_probs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    hit_eos = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    row_prompt_len = prompt_len.repeat_interleave(k)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    check_every = FINISHED_CHECK_EVERY.get(device.type, 1)
    all_greedy = all(params.greedy for params in continuations)
    # continuations whose recorded log-probs are at their sampling temperature
    tempered = [(c, params.temperature) for c, params in enumerate(continuations)
                if tempered_log_probs and not params.greedy and params.temperature != 1.0]

    def rows_of(prompts: slice) -> slice:  # rows are prompt-major
        return slice(prompts.start * k, prompts.stop * k)

    def decode(g: slice, step: int, chosen, step_positions):
        if routes is not None:
            routes.decode(step, rows_of(g))
        return fwd.hidden(chosen[rows_of(g)].unsqueeze(1), step_positions[rows_of(g)],
                          _decode_attend(cache, step - 1, g))

    step = 0
    while True:
        if logits is not None:
            chosen, chosen_logits = _choose_rows(logits, continuations, uniforms[:, step])
            for c, temperature in tempered:  # the logits are not needed after the choice
                logits[c::k].div_(temperature)
                chosen_logits[c::k].div_(temperature)
            lp = _log_probs_(logits, chosen_logits, all_greedy)
            log_probs[:, step] = torch.where(finished, 0.0, lp) if eos else lp
        else:
            chosen = torch.zeros(rows, dtype=torch.long, device=device)
        chosen = pipe.from_last(chosen)
        if eos:  # without EOS ids no row ever finishes early
            chosen = torch.where(finished, pad_token_id, chosen)
            lengths += (~finished).long()
            newly_eos = ~finished & torch.isin(chosen, eos_ids)
            hit_eos |= newly_eos
            finished |= newly_eos
        tokens[:, step] = chosen
        step += 1
        if step == max_new_tokens:
            break
        if not rows and fwd.ep_group is None:  # nothing to generate
            break
        # every row finished (here, and with expert parallelism on every rank of the group)
        if step % check_every == 0 and fwd.all_done(
                not rows or (bool(eos) and bool(finished.all()))):
            break
        step_positions = (row_prompt_len + step - 1).unsqueeze(1)
        if decode_step is not None:
            logits = decode_step(chosen.unsqueeze(1), step_positions, step - 1)
            continue
        logits = _last_stage_logits(fwd, vocab_size, [
            decode(g, step, chosen, step_positions) for g in decode_groups])

    log_probs = pipe.from_last(log_probs)
    if not eos:
        lengths.fill_(step)
    elif rows:  # where the loop stops when checking after every step: the longest row
        step = int(lengths.max())
    tokens, log_probs = tokens[:, :step], log_probs[:, :step]
    response_mask = torch.arange(step, device=device)[None, :] < lengths[:, None]
    reasons = ["eos" if e else "length" for e in hit_eos.tolist()]
    return GenerationOutput(
        tokens=tokens, response_mask=response_mask, lengths=lengths, finish_reason=reasons,
        log_probs=log_probs * response_mask, prompt_index=torch.arange(batch).repeat_interleave(k),
        continuation=torch.arange(k).repeat(batch))


def _pipeline_groups(batch: int, pp: int, requested: int) -> tuple[list, list]:
    """Prompt groups of the prefill and of each decode step (see ``pipeline_micro_batches``)."""
    if pp == 1:
        return [slice(0, batch)], [slice(0, batch)]
    if requested == 0:
        return _prompt_groups(batch, 2 * pp), [slice(0, batch)]
    return _prompt_groups(batch, requested), _prompt_groups(batch, requested)


def _prompt_groups(batch: int, count: int) -> list[slice]:
    """``count`` contiguous, nearly equal groups of prompts (fewer when there are fewer prompts)."""
    count = max(1, min(count, batch))
    bounds = [round(i * batch / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _last_stage_logits(fwd: StageForward, vocab_size: int, hidden: list) -> torch.Tensor | None:
    """Logits over the true vocabulary (padded ids are never produced) of every group, in row
    order (last stage; None elsewhere)."""
    if hidden[0] is None:
        return None
    if len(hidden) == 1:
        return fwd.logits(hidden[0], vocab_size)
    return torch.cat([fwd.logits(h, vocab_size) for h in hidden])


def _sampling_streams(continuations: list) -> list:
    """Random stream of each continuation: its index among the sampled ones (greedy: None), so
    a (greedy, sampled) pair samples exactly what a sampled-only call does."""
    streams, count = [], 0
    for params in continuations:
        streams.append(None if params.greedy else count)
        count += 0 if params.greedy else 1
    return streams


def _prefill_attend(cache: SharedPrefixKVCache, prompts: slice):
    def attend(layer, q, k, v):
        return cache.prefill(layer, q, k, v, prompts)
    return attend


def _decode_attend(cache: SharedPrefixKVCache, step: int, prompts: slice):
    def attend(layer, q, k, v):
        return cache.decode(layer, step, q, k, v, prompts)
    return attend


def _choose_rows(logits: torch.Tensor, continuations: list,
                 uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row and its logit. Rows are prompt-major, so continuation c owns
    rows c, c+k, c+2k, ..."""
    k = len(continuations)
    if k == 1:
        return _choose(logits, continuations[0], uniforms)
    chosen = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
    chosen_logits = torch.empty(logits.size(0), dtype=logits.dtype, device=logits.device)
    for c, params in enumerate(continuations):
        chosen[c::k], chosen_logits[c::k] = _choose(logits[c::k], params, uniforms[c::k])
    return chosen, chosen_logits


def _log_probs_(logits: torch.Tensor, chosen_logits: torch.Tensor, greedy: bool) -> torch.Tensor:
    """log softmax(logits)[chosen] as logsumexp computes it (max-shifted), reusing ``logits`` as
    the buffer of the shifted exponentials: no vocab-sized temporary per step (the logits are
    not needed after the choice). Greedy rows chose their max already."""
    top = chosen_logits if greedy else logits.amax(dim=-1)
    top = top.masked_fill(top.isinf(), 0.0)  # as torch.logsumexp: an infinite max stays infinite
    total = logits.sub_(top[:, None]).exp_().sum(dim=-1)
    return chosen_logits - (total.log_() + top)


def _choose(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor):
    if params.greedy:
        # choose()'s greedy rule (the first maximal id); max gives its logit too, and is faster
        # than argmax on the CPU
        values, ids = logits.max(dim=-1)
        return ids, values
    ids = choose(logits, params, uniforms)
    return ids, logits.gather(-1, ids[:, None]).squeeze(-1)
