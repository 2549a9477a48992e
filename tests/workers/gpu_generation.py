"""The rollout engine and the layer specs in reduced precision on a GPU (tests/test_gpu.py), one
check per call; it runs on the CPU too (fp32 or bf16), as a sanity check of the same code.

- ``--check greedy``: a tiny random GPT-2 and Llama (GQA) built with transformers, converted with
  hf_to_mcore at ``--dtype`` and generated greedily with remax_megatron.rollout.engine.generate on
  ``--device``; the oracle is transformers' greedy generate at the same dtype on the same device,
  prompts of different lengths, left-padded. Two bf16 implementations round differently (by a
  bf16 step or two of the logits), so where transformers' top-2 logit gap is below ``--tie`` (a
  near-tie) either token is right, and after a different pick the rows differ for good. Each row
  is therefore compared token for token up to its first near-tie (``strict_compared_tokens``),
  and also up to the first step where the two differ, which must be a near-tie
  (``compared_tokens``: past a near-tie where both made the same pick the inputs are still
  identical, so agreement there is still checked). The report says how many tokens each rule
  compared, so that a check that compared next to nothing does not pass silently.
- ``--check te``: logits of the same converted checkpoint built with megatron-core's Transformer
  Engine layer spec and with the local spec, one forward of a random batch each.

  python tests/workers/gpu_generation.py --check greedy --device cuda --dtype bf16 --report r.json
  python tests/workers/gpu_generation.py --check greedy --device cpu --dtype fp32 --report r.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from remax_megatron import tiny
from remax_megatron.convert.commands import hf_to_mcore
from remax_megatron.models.checkpoint import load_model
from remax_megatron.rollout import static_decode
from remax_megatron.rollout.engine import generate
from remax_megatron.rollout.generate_command import left_pad
from remax_megatron.runtime.distributed import init_runtime, shutdown

ARCHS = {"gpt2": "GPT2LMHeadModel", "llama_gqa": "LlamaForCausalLM"}
# larger than the CPU suite's tiny models (hidden 64): still seconds to build, but bf16 rounding
# goes through matrices of a realistic aspect (head dim 32, four layers)
SHAPES = {
    "gpt2": dict(n_embd=256, n_layer=4, n_head=8, n_positions=256),
    "llama_gqa": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256),
}
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog .", "a",
           "red green blue", "numbers one two three four five six seven", "cats and dogs play",
           "how are you today ?", "tensor parallel layers split the weights"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(name: str, root: Path, dtype: str, seed: int):
    """(transformers model in fp32, our converted checkpoint at ``dtype``, tokenizer)."""
    tokenizer = tiny.build_tokenizer(300)
    model = tiny.build_hf_model(ARCHS[name], len(tokenizer), seed=seed, **SHAPES[name])
    hf_dir = tiny.save_hf(model, tokenizer, root / f"{name}_hf")
    return model, hf_to_mcore(hf_dir, root / name, dtype=dtype), tokenizer


def hf_greedy(model, ids, mask, max_new: int):
    """transformers' greedy tokens [B, T] and its raw logits [B, T, V] (fp32), no EOS stop."""
    config = model.generation_config
    config.eos_token_id = None  # run every row to max_new, as our call without eos ids does
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                         pad_token_id=0, generation_config=config,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, ids.size(1):]
    logits = torch.stack(out.logits, dim=1).float()
    return tokens, logits


def near_ties(logits: torch.Tensor, tie: float) -> torch.Tensor:
    """[B, T] bool: steps whose top-2 logit gap is below ``tie``."""
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) < tie


def compare_rows(ours: torch.Tensor, theirs: torch.Tensor, logits: torch.Tensor,
                 tie: float) -> dict:
    """Row by row: how far the two greedy sequences agree, and every divergence that is not at a
    near-tie of transformers' logits (a failure)."""
    near = near_ties(logits, tie).tolist()
    strict, agreed, failures = [], [], []
    for row, (a, b) in enumerate(zip(ours.tolist(), theirs.tolist())):
        strict.append(near[row].index(True) if True in near[row] else len(a))
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agreed.append(first)
        if first < len(a) and not near[row][first]:
            top = logits[row, first].topk(2).values
            failures.append({"row": row, "step": first, "ours": a[first], "transformers": b[first],
                             "hf_top2_gap": float(top[0] - top[1])})
        elif first < strict[-1]:  # cannot happen: a divergence before the first near-tie fails
            raise AssertionError((row, first, strict[-1]))
    return {"strict_compared_tokens": sum(strict), "compared_tokens": sum(agreed),
            "total_tokens": ours.numel(), "first_near_tie": strict, "first_difference": agreed,
            "failures": failures,
            "near_tie_fraction": sum(map(sum, near)) / ours.numel()}


def check_greedy(args, root: Path, device: torch.device, dtype: torch.dtype) -> dict:
    report = {}
    for seed, name in enumerate(ARCHS):
        hf, ckpt, tokenizer = build(name, root, args.dtype, seed)
        ids, mask = left_pad([tokenizer(p).input_ids for p in PROMPTS], 0)
        ids, mask = ids.to(device), mask.to(device)
        hf = hf.to(device=device, dtype=dtype)
        hf_tokens, hf_logits = hf_greedy(hf, ids, mask, args.max_new_tokens)
        ours, checkpoint = load_model(ckpt)
        ours = ours.to(device)
        captures = []
        capture = static_decode.StaticDecode._capture
        static_decode.StaticDecode._capture = lambda self: captures.append(1) or capture(self)
        try:  # on a GPU the decode step is captured as a CUDA graph (static_decode.py)
            out = generate(ours, ids, mask, max_new_tokens=args.max_new_tokens,
                           vocab_size=checkpoint.config.vocab_size, pad_token_id=0)
        finally:
            static_decode.StaticDecode._capture = capture
        eager = generate(ours, ids, mask, max_new_tokens=args.max_new_tokens,
                         vocab_size=checkpoint.config.vocab_size, pad_token_id=0,
                         cuda_graph=False)
        assert out.tokens.shape == hf_tokens.shape, (out.tokens.shape, hf_tokens.shape)
        report[name] = compare_rows(out.tokens.cpu(), hf_tokens.cpu(), hf_logits.cpu(), args.tie)
        report[name]["graph_captures"] = len(captures)
        report[name]["eager"] = compare_rows(eager.tokens.cpu(), hf_tokens.cpu(),
                                             hf_logits.cpu(), args.tie)
        report[name].update(param_dtype=str(next(ours.parameters()).dtype),
                            hf_dtype=str(next(hf.parameters()).dtype),
                            logit_scale=hf_logits.abs().max().item())
        del hf, ours
    return report


def check_te(args, root: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """Logits of the two specs at ``dtype``, each also against the local spec in fp32 (the same
    bf16-rounded weights, upcast exactly): TE should be about as close to it as the local spec."""
    report = {}
    base, other = args.specs.split(",")
    for seed, name in enumerate(ARCHS):
        _, ckpt, tokenizer = build(name, root, args.dtype, seed)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, len(tokenizer), (4, 64), generator=g).to(device)
        positions = torch.arange(ids.size(1), device=device).expand_as(ids)
        logits = {}
        for label, spec, params_dtype in ((base, base, dtype), (other, other, dtype),
                                           ("fp32", "local", torch.float32)):
            model, checkpoint = load_model(ckpt, params_dtype=params_dtype, spec=spec)
            model = model.to(device).eval()
            with torch.no_grad():
                out = model(ids, positions, None)[..., :checkpoint.config.vocab_size].float()
            logits.setdefault(label, out)  # base == other (a dry run): the first one
            report[f"{name}/{label}_qkv"] = type(
                model.decoder.layers[0].self_attention.linear_qkv).__name__
            del model
        a, b, ref = logits[base], logits[other], logits["fp32"]
        diff = (b - a).abs()
        report[name] = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
                        f"{base}_vs_fp32_max": (a - ref).abs().max().item(),
                        f"{other}_vs_fp32_max": (b - ref).abs().max().item(),
                        "logit_scale": ref.abs().max().item(),
                        "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                        "specs": [base, other]}
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", required=True, choices=("greedy", "te"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--report", required=True)
    p.add_argument("--specs", default="local,te",
                   help="--check te: the two layer specs compared (local,local: a CPU dry run)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tie", type=float, default=0.1,
                   help="a top-2 logit gap below this is a near-tie (default: %(default)s)")
    args = p.parse_args()
    runtime = init_runtime(tp=1, pp=1, seed=1234)
    device = torch.device(args.device)
    if runtime.device.type != device.type:
        sys.exit(f"asked for --device {args.device} but the runtime chose {runtime.device} "
                 f"({runtime.backend})")
    with tempfile.TemporaryDirectory(prefix="gpu_generation_") as tmp:
        check = check_greedy if args.check == "greedy" else check_te
        report = check(args, Path(tmp), device, DTYPES[args.dtype])
    report["device"] = (torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    report["backend"] = runtime.backend
    Path(args.report).write_text(json.dumps(report, indent=1))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
