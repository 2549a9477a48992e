"""Multi-rank worker: megatron's sequence parallelism against a single-process reference, on the
same weights and micro-batches, through the trainer's own plumbing (megatron DDP, the optimizer,
get_forward_backward_func, the KV-cached rollout).

  python scale_features.py --reference REF.pt
  torchrun --nproc-per-node N scale_features.py --check REF.pt --report OUT.json --tp T [--pp P]
      [--settings no_sp,sp,sp_selective,sp_full]

Per model (a GQA Llama: RoPE, so megatron reduce-scatters the word embeddings, RMSNorm, SwiGLU;
a GPT-2 with tied embeddings: learned positions, so megatron scatters after adding them, LayerNorm
and biases) and per setting (sequence_parallel off and on, at the same tp/pp): the loss, every
gathered gradient (the norms' and the row-parallel biases' are partial sums per rank under
sequence parallelism, all-reduced by megatron's finalize_model_grads), the gradient norm, the
weights after one optimizer step, and greedy tokens decoded with sequence parallelism switched off
by ``sequence_parallel_off`` (which must put every attribute back as it was). Sequence
parallelism is also run together with selective and full activation recompute.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from remax_megatron.models.builder import (
    SEQUENCE_PARALLEL_ATTRS, build_policy, sequence_parallel_off, unwrap,
)
from remax_megatron.models.config import ModelConfig
from remax_megatron.models.sharding import (
    assemble_full, load_full_state_dict, local_shards, seeded_full_weights,
)
from remax_megatron.ops.logprobs import vocab_parallel_log_probs
from remax_megatron.rollout.engine import generate
from remax_megatron.runtime.distributed import init_runtime, shutdown
from remax_megatron.training.engine import OptimizerSettings, build_optimizer, update, wrap_ddp
from worker_io import reference_parser

WIDTH, ROWS, MBS, SEED = 10, 4, 2, 5  # WIDTH: a multiple of tp under sequence parallelism
CASES = {
    "llama_gqa": ModelConfig.llama(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ffn_hidden_size=96, vocab_size=100, max_position_embeddings=64),
    "gpt2_tied": ModelConfig.gpt2(num_layers=2, hidden_size=64, num_attention_heads=4,
                                  vocab_size=130, max_position_embeddings=64),
}


# sequence parallelism off and on, and on together with activation recompute
SETTINGS = {"no_sp": (False, "none"), "sp": (True, "none"),
            "sp_selective": (True, "selective"), "sp_full": (True, "full")}


def batches(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (ROWS, WIDTH), generator=g)
    mask = (torch.rand(ROWS, WIDTH - 1, generator=g) > 0.3).float()
    weight = torch.randn(ROWS, WIDTH - 1, generator=g)
    return [{"input_ids": ids[s:s + MBS], "position_ids": torch.arange(WIDTH).expand(MBS, WIDTH),
             "loss_mask": mask[s:s + MBS], "weight": weight[s:s + MBS]}
            for s in range(0, ROWS, MBS)]


def sp_state(model) -> list:
    gpt = unwrap(model)
    return [gpt.config.sequence_parallel] + [
        (name, attr, getattr(module, attr)) for name, module in gpt.named_modules()
        for attr in SEQUENCE_PARALLEL_ATTRS if isinstance(getattr(module, attr, None), bool)]


def run_case(config: ModelConfig, sequence_parallel: bool, recompute: str = "none") -> dict:
    from megatron.core import parallel_state as ps

    model = build_policy(config, perform_initialization=False, sequence_parallel=sequence_parallel,
                         recompute=recompute)
    load_full_state_dict(model, seeded_full_weights(model, SEED))
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, OptimizerSettings(lr=1e-3, weight_decay=0.0, clip_grad=0.5))
    losses, norm_rows = [], []
    # the sequence length a norm sees in training: WIDTH / tp under sequence parallelism
    unwrap(model).decoder.layers[0].input_layernorm.register_forward_hook(
        lambda module, args, output: norm_rows.append(args[0].size(0)))

    def loss_fn(output, batch):
        lp = vocab_parallel_log_probs(output[:, :-1], batch["input_ids"][:, 1:],
                                      config.vocab_size)
        mask = batch["loss_mask"]
        loss = -(lp * batch["weight"] * mask).sum()
        losses.append(loss.detach())
        return loss, mask.sum().round().to(torch.int), {}

    applied, grad_norm = update(ddp, optimizer, batches(config.vocab_size), loss_fn, WIDTH, MBS)
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    out = {"loss": float(sum(losses)) if losses else None, "grad_norm": grad_norm,
           "applied": applied, "norm_rows": sorted(set(norm_rows))}
    shards = {"grads": local_shards(model, grads), "weights": local_shards(model)}

    before = sp_state(ddp)
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, config.vocab_size, (3, 5), generator=g)
    with sequence_parallel_off(ddp):
        inside = sp_state(ddp)
        tokens = generate(ddp, prompts, torch.ones_like(prompts), max_new_tokens=6,
                          vocab_size=config.vocab_size).tokens
    after = sp_state(ddp)
    out["tokens"] = tokens.tolist()
    out["restored"] = before == after
    out["off_inside"] = not inside[0] and not any(value for _, _, value in inside[1:])
    out["sp_modules"] = sum(1 for _, attr, value in before[1:]
                            if attr == "sequence_parallel" and value)

    # the full tensors, from every tp rank of the first dp replica (all stages)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"tp": ps.get_tensor_model_parallel_rank(),
                                      "pp": ps.get_pipeline_model_parallel_rank(),
                                      "dp": ps.get_data_parallel_rank(), **shards, **out})
    last = [r for r in per_rank if r["loss"] is not None and r["dp"] == 0]
    stages: dict = {}
    for r in sorted((r for r in per_rank if r["dp"] == 0), key=lambda r: (r["pp"], r["tp"])):
        stages.setdefault(r["pp"], []).append(r)
    full = {"grads": {}, "weights": {}}
    for ranks in stages.values():
        for key in full:
            full[key].update(assemble_full([r[key] for r in ranks], config.vocab_size))
    return {"loss": last[0]["loss"], "grad_norm": per_rank[0]["grad_norm"],
            "applied": all(r["applied"] for r in per_rank), "tokens": per_rank[0]["tokens"],
            "restored": all(r["restored"] for r in per_rank),
            "off_inside": all(r["off_inside"] for r in per_rank),
            "sp_modules": min(r["sp_modules"] for r in per_rank),
            "norm_rows": per_rank[0]["norm_rows"], **full}


def compare(ref: dict, got: dict) -> dict:
    """Largest relative differences (0 is exact); booleans as 0 (holds) / 1 (fails)."""
    report = {"loss": abs(got["loss"] - ref["loss"]) / max(1.0, abs(ref["loss"])),
              "grad_norm": abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
              "applied": float(not got["applied"]),
              "tokens": float(got["tokens"] != ref["tokens"]),
              "restored": float(not got["restored"]),
              "off_inside": float(not got["off_inside"])}
    for key in ("grads", "weights"):
        want = dict(ref[key])
        if "output_layer.weight" in got[key] and "output_layer.weight" not in want:
            # tied embeddings at pp > 1: the last stage's copy, kept equal by megatron
            want["output_layer.weight"] = want["embedding.word_embeddings.weight"]
        assert set(got[key]) == set(want), set(got[key]) ^ set(want)
        scale = max(t.abs().max().item() for t in want.values())
        report[key] = max((got[key][n] - want[n]).abs().max().item() / scale for n in want)
    return report


def main() -> int:
    parser = reference_parser()
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()

    init_runtime(tp=args.tp, pp=args.pp, seed=1234, timeout_minutes=5)
    if args.reference:
        results = {name: run_case(config, False) for name, config in CASES.items()}
        if dist.get_rank() == 0:
            torch.save(results, args.reference)
    else:
        ref = torch.load(args.check, weights_only=False)
        report = {}
        for name, config in CASES.items():
            for tag in args.settings.split(","):
                got = run_case(config, *SETTINGS[tag])
                tag = f"{name}/{tag}"
                report.update({f"{tag}/{k}": v for k, v in compare(ref[name], got).items()})
                report[f"{tag}/sp_modules"] = got["sp_modules"]
                report[f"{tag}/norm_rows"] = got["norm_rows"]
        if dist.get_rank() == 0:
            with open(args.report, "w") as f:
                json.dump(report, f, indent=1)
    shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
