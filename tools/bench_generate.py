#!/usr/bin/env python
"""Decode speed: our KV-cached decode loop against transformers' generate and against the bare
weight GEMMs of the same decode step, on a GPT-2-124M- (default) or Llama-1B-shaped model
(--model llama-1b) with random weights, or on SmolLM2-135M-Instruct's real weights (--model
smollm2: tools/prepare_smollm2.py's models/smollm2, prepared there if missing).

  python tools/bench_generate.py [--model gpt2|llama-1b|smollm2] [--batches 1,8,16] [--dtype fp32,bf16] [--prompt-len 64]
                                 [--new-tokens 64] [--repeats 3] [--threads 2]
                                 [--device cpu|cuda] [--clock wall|cpu] [--pair] [--quick]

transformers runs in a separate process (this script re-invoked with --hf-worker) that never
imports remax_megatron: no torch-function mode of ours, no megatron import side effects, its own
allocator state. Both processes build the same model (transformers from a config, saved once; ours
converted from that directory with hf_to_mcore), use the same prompts, lengths, dtype and torch
thread count, and run alternately (ours, bare GEMMs, transformers, ours, ...), so that load on
the machine hits all alike. Each reports the median decode-step time of a run (the time between
consecutive next-token choices: forward, token choice and bookkeeping), the median over repeats
and decode tokens/s; ratios are medians of the per-repeat ratios.

The bare-GEMM baseline is the step's weight matmuls alone, in this process, same batch and dtype:
per layer QKV, attention output projection, fc1 and fc2 (F.linear on our [out, in] weights, with
their biases), and the output layer over the true vocabulary. ours / bare is what our decode step
costs beyond its matmuls (attention, norms, activation, token choice, log-probs, Python). The same
products computed as W @ x.T are timed too (on the CPU our decode steps use that form where MKL
runs it faster): "against the faster form" divides by the quicker of the two.

On CUDA it also prints the fraction of the memory-bandwidth roofline (weight bytes / HBM bandwidth
per decode step). --quick: a tiny model and a few tokens (a smoke run, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
# (ours / bare-GEMM upper bound, HF / ours lower bound) by dtype, at batch >= 8
TARGETS = {"fp32": (1.15, 1.15), "bf16": (1.3, 1.4)}
SMALL_BATCH_HF_TARGET = 0.95  # HF / ours at batch < 8
# --model: (label, transformers config class, shape; --quick: a tiny shape of the same family)
MODELS = {
    "gpt2": ("GPT-2-124M", "GPT2Config",
             dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    # the Llama-3.2-1B shape: GQA 32/8 heads, SwiGLU, 128256-id vocabulary, tied embeddings
    "llama-1b": ("Llama-1.2B", "LlamaConfig",
                 dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                      max_position_embeddings=2048, tie_word_embeddings=True)),
    # real weights (GQA 9/3 heads, 30 layers, 49152 ids, tied embeddings): no config to build
    "smollm2": ("SmolLM2-135M-Instruct", None, {}),
}
SMOLLM2_DIR = Path(__file__).resolve().parents[1] / "models" / "smollm2"
TINY = {"gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=512),
        "llama-1b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=176, vocab_size=512,
                         max_position_embeddings=64, tie_word_embeddings=True)}


def _dtype(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _prompts(vocab: int, batch: int, prompt_len: int, device):
    """The same prompts in both processes (a seeded CPU generator)."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    return ids.to(device), torch.ones_like(ids).to(device)


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def _stamp(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return CLOCK()


def _median_step(stamps: list) -> float:
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


# --- transformers side (separate process; never imports remax_megatron) -------------------------

def hf_worker(args) -> int:
    """Serve decode runs of the saved transformers model: one JSON request per stdin line
    ({"dtype", "batch", "prompt_len", "new_tokens"}), one JSON answer per stdout line."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {}

    class Stamp(transformers.LogitsProcessor):
        """Called once per generated token, right after the forward that produced its logits."""

        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(_stamp(device))
            return scores

    def model(dtype_name):
        if dtype_name not in models:
            m = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
            m.generation_config.eos_token_id = None  # run to max_new_tokens, as ours does
            models[dtype_name] = m.to(device=device, dtype=_dtype(dtype_name)).eval()
        return models[dtype_name]

    from torch.overrides import _get_current_function_mode_stack

    out = sys.stdout
    sys.stdout = sys.stderr  # only answers on the pipe
    for line in sys.stdin:
        req = json.loads(line)
        hf = model(req["dtype"])
        ids, mask = _prompts(hf.config.vocab_size, req["batch"], req["prompt_len"], device)
        stamp = Stamp()
        generated = hf.generate(ids, attention_mask=mask, do_sample=False,
                                max_new_tokens=req["new_tokens"], pad_token_id=0,
                                logits_processor=transformers.LogitsProcessorList([stamp]))
        answer = {"step_s": _median_step(stamp.stamps) if len(stamp.stamps) > 1 else None,
                  "tokens": generated[:, ids.size(1):].tolist(),
                  "imports_remax_megatron": "remax_megatron" in sys.modules,
                  "torch_function_modes": len(_get_current_function_mode_stack()),
                  "threads": torch.get_num_threads()}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


class HFWorker:
    def __init__(self, hf_dir: Path, args, log: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", "--hf-dir",
               str(hf_dir), "--threads", str(args.threads), "--device", args.device,
               "--clock", args.clock]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True)

    def run(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"the transformers worker died:\n{tail}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --- our side -----------------------------------------------------------------------------------

class Ours:
    """Our decode loop with a timestamp at every next-token choice (the engine's per-step logits
    function, wrapped), and the bare weight GEMMs of one decode step."""

    def __init__(self, checkpoint: Path, vocab: int, device):
        from remax_megatron.rollout import engine, static_decode

        self.engine, self.checkpoint, self.vocab, self.device = engine, checkpoint, vocab, device
        self.models = {}
        self.stamps = []
        self.cuda_graph = True

        def stamp(inner):
            def stamped(*a, **kw):
                logits = inner(*a, **kw)
                self.stamps.append(_stamp(device))
                return logits
            return stamped

        # the eager steps' logits, and the static steps' (a CUDA graph's replay on a GPU)
        engine._last_stage_logits = stamp(engine._last_stage_logits)
        static_decode.StaticDecode.__call__ = stamp(static_decode.StaticDecode.__call__)

    def model(self, dtype_name):
        from remax_megatron.models.checkpoint import load_model

        if dtype_name not in self.models:
            model, _ = load_model(self.checkpoint, params_dtype=_dtype(dtype_name))
            self.models[dtype_name] = model.to(self.device).eval()
        return self.models[dtype_name]

    def generate(self, dtype_name, batch, prompt_len, new_tokens, continuations=None):
        from remax_megatron.rollout.sampling import GREEDY

        ids, mask = _prompts(self.vocab, batch, prompt_len, self.device)
        self.stamps = []
        out = self.engine.generate(self.model(dtype_name), ids, mask,
                                   continuations=continuations or (GREEDY,),
                                   max_new_tokens=new_tokens, vocab_size=self.vocab,
                                   cuda_graph=self.cuda_graph)
        return _median_step(self.stamps) if len(self.stamps) > 1 else None, out

    def bare_gemms(self, dtype_name, batch, transposed=False):
        """A function running one decode step's weight matmuls on [batch, in] activations: as
        F.linear (x @ W.T), or ``transposed`` as W @ x.T (the form our CPU decode steps use
        where it is faster, see rollout/forward._columns)."""
        import torch
        import torch.nn.functional as F

        from remax_megatron.models.builder import unwrap

        gpt = unwrap(self.model(dtype_name))
        dtype, work = _dtype(dtype_name), []
        g = torch.Generator().manual_seed(2)

        def act(width):
            return torch.randn(batch, width, generator=g).to(self.device, dtype)

        for layer in gpt.decoder.layers:
            attn, mlp = layer.self_attention, layer.mlp
            for linear in (attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2):
                work.append((act(linear.weight.size(1)), linear.weight, linear.bias))
        out_weight = (gpt.shared_embedding_or_output_weight()
                      if gpt.share_embeddings_and_output_weights else gpt.output_layer.weight)
        work.append((act(out_weight.size(1)), out_weight[:self.vocab], None))

        if transposed:
            work = [(x, w, None if b is None else b[:, None]) for x, w, b in work]

        def step():
            with torch.no_grad():
                for x, w, b in work:
                    if not transposed:
                        F.linear(x, w, b)
                    elif b is None:
                        torch.mm(w, x.t())
                    else:
                        torch.addmm(b, w, x.t())
        return step


def _time_fn(fn, device, repeats=5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = _stamp(device)
        fn()
        times.append(_stamp(device) - start)
    return statistics.median(times)


def _verdict(value, bound, upper: bool) -> str:
    if bound is None:
        return "(no target)"
    ok = value <= bound if upper else value >= bound
    return f"(target {'<=' if upper else '>='} {bound:.2f}): {'PASS' if ok else 'MISS'}"


def _bf16_supported(device) -> bool:
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _smollm2() -> tuple[Path, Path]:
    """The prepared real model's transformers and remax-megatron directories."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import prepare_smollm2

    if not (SMOLLM2_DIR / "mcore" / "remax_checkpoint.json").is_file():
        prepare_smollm2.prepare(SMOLLM2_DIR)
    return SMOLLM2_DIR / "hf", SMOLLM2_DIR / "mcore"


def _parameter_count(hf_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in hf_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def main_bench(args) -> int:
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from remax_megatron.convert.commands import hf_to_mcore
    from remax_megatron.runtime import cpu_compat
    from remax_megatron.runtime.distributed import init_runtime
    from remax_megatron.rollout.sampling import GREEDY, SamplingParams

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = [d for d in args.dtype.split(",") if d]
    if "bf16" in dtypes and not _bf16_supported(device):
        print(f"bf16 skipped: not supported on this {device.type} (mkldnn bf16 unavailable)")
        dtypes.remove("bf16")
    label, config_class, shape = MODELS[args.model]
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    if args.model == "smollm2":
        hf_dir, mcore = _smollm2()
        config = transformers.AutoConfig.from_pretrained(hf_dir)
        params = _parameter_count(hf_dir)
    else:
        if args.quick:
            label, shape = f"{label} family, tiny (--quick)", {**shape, **TINY[args.model]}
        config = getattr(transformers, config_class)(**shape)
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(config).eval()
        params = sum(p.numel() for p in hf.parameters())
        hf_dir, mcore = work / "hf", work / "mcore"
        hf.save_pretrained(hf_dir)
        del hf
        hf_to_mcore(hf_dir, mcore, dtype="fp32")
    init_runtime(tp=1, pp=1)

    ours = Ours(mcore, config.vocab_size, device)
    ours.cuda_graph = args.cuda_graph == "on"
    worker = HFWorker(hf_dir, args, work / "hf_worker.log")
    batches = [int(b) for b in args.batches.split(",")]
    n, plen = args.new_tokens, args.prompt_len
    print(f"model: {label} shape "
          f"({params / 1e6:.1f}M parameters), {device}, torch threads {args.threads} in both "
          f"processes; prompt {plen}, {n} new tokens (greedy), {args.repeats} alternating repeats, "
          f"{'CPU' if args.clock == 'cpu' else 'wall-clock'} time"
          + (f"; our decode step {'as one CUDA graph' if ours.cuda_graph else 'eager'}"
             if device.type == "cuda" else ""))
    rows, isolated = [], True
    try:
        for dtype_name in dtypes:
            for batch in batches:
                request = dict(dtype=dtype_name, batch=batch, prompt_len=plen, new_tokens=n)
                bare = ours.bare_gemms(dtype_name, batch)
                bare_t = ours.bare_gemms(dtype_name, batch, transposed=True)
                ours.generate(dtype_name, batch, plen, min(n, 4))  # warm-up
                worker.run(**{**request, "new_tokens": min(n, 4)})
                t_ours, t_hf, t_bare, t_bare_t, r_bare, r_best, r_hf = [], [], [], [], [], [], []
                for _ in range(args.repeats):
                    step, out = ours.generate(dtype_name, batch, plen, n)
                    with cpu_compat.suspended():
                        gemm = _time_fn(bare, device)
                        gemm_t = _time_fn(bare_t, device)
                    answer = worker.run(**request)
                    isolated &= (not answer["imports_remax_megatron"]
                                 and answer["torch_function_modes"] == 0)
                    t_ours.append(step), t_bare.append(gemm), t_hf.append(answer["step_s"])
                    t_bare_t.append(gemm_t)
                    r_bare.append(step / gemm), r_hf.append(answer["step_s"] / step)
                    r_best.append(step / min(gemm, gemm_t))
                same = sum(a == b for a, b in zip(out.tokens.tolist(), answer["tokens"]))
                row = dict(dtype=dtype_name, batch=batch, ours=statistics.median(t_ours),
                           hf=statistics.median(t_hf), bare=statistics.median(t_bare),
                           bare_t=statistics.median(t_bare_t),
                           ours_bare=statistics.median(r_bare), hf_ours=statistics.median(r_hf),
                           ours_best=statistics.median(r_best),
                           same=same)
                rows.append(row)
                _print_row(row)
        if args.pair:
            _print_pair(ours, dtypes[0], batches[-1], plen, n, args.repeats,
                        (GREEDY, SamplingParams(temperature=1.0, top_p=0.9)))
    finally:
        worker.close()
        shutil.rmtree(work, ignore_errors=True)  # two copies of a random model
    print(f"transformers worker: separate process, imported remax_megatron: "
          f"{'no' if isolated else 'YES'}, torch-function modes active: "
          f"{'none' if isolated else 'some'}")
    _print_summary(rows)
    if device.type == "cuda":
        _print_roofline(ours, rows, dtypes)
    return 0


def _print_row(row):
    hi = row["batch"] >= 8
    bare_bound, hf_bound = TARGETS[row["dtype"]]
    ms = 1e3
    print(f"{row['dtype']} batch {row['batch']:3d}: ours {row['ours'] * ms:8.2f} ms/step "
          f"({row['batch'] / row['ours']:8.1f} tokens/s) | transformers {row['hf'] * ms:8.2f} "
          f"ms/step ({row['batch'] / row['hf']:8.1f} tokens/s) | bare GEMMs "
          f"{row['bare'] * ms:8.2f} ms (as W @ x.T: {row['bare_t'] * ms:.2f} ms) | greedy rows "
          f"identical to transformers: {row['same']}/{row['batch']}")
    print(f"  {row['dtype']} batch {row['batch']:3d} ours/bare-GEMM ratio {row['ours_bare']:.3f} "
          f"{_verdict(row['ours_bare'], bare_bound if hi else None, upper=True)}; "
          f"against the faster form of the GEMMs {row['ours_best']:.3f}")
    print(f"  {row['dtype']} batch {row['batch']:3d} HF/ours speedup {row['hf_ours']:.3f} "
          f"{_verdict(row['hf_ours'], hf_bound if hi else SMALL_BATCH_HF_TARGET, upper=False)}")
    sys.stdout.flush()


def _print_summary(rows):
    print("summary (median of per-repeat ratios):")
    print("  dtype batch  ours ms   HF ms  bare ms  bare W@x.T ms  ours/bare  ours/best-bare  "
          "HF/ours")
    for r in rows:
        print(f"  {r['dtype']:5s} {r['batch']:5d} {r['ours'] * 1e3:8.2f} {r['hf'] * 1e3:7.2f} "
              f"{r['bare'] * 1e3:8.2f} {r['bare_t'] * 1e3:14.2f} {r['ours_bare']:10.3f} "
              f"{r['ours_best']:15.3f} {r['hf_ours']:8.3f}")


def _print_pair(ours, dtype_name, batch, plen, n, repeats, pair):
    """The ReMax pair (greedy + sampled, one shared prefill) against two separate calls."""
    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    apart, together = [], []
    for _ in range(repeats):
        apart.append(timed(lambda: [ours.generate(dtype_name, batch, plen, n, (c,)) for c in pair]))
        together.append(timed(lambda: ours.generate(dtype_name, batch, plen, n, pair)))
    a, t = statistics.median(apart), statistics.median(together)
    print(f"ReMax pair ({dtype_name}, batch {batch}; greedy + sampled, one shared prefill): "
          f"{t:.2f}s vs two separate calls {a:.2f}s: {a / t:.2f}x faster")


def _print_roofline(ours, rows, dtypes):
    import torch

    name = torch.cuda.get_device_name()
    bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    for dtype_name in dtypes:
        model = ours.model(dtype_name)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"decode roofline on {name}, {dtype_name}: weight bytes {weight_bytes / 1e6:.0f} MB "
              "per step")
        for r in rows:
            if r["dtype"] == dtype_name:
                frac = (weight_bytes / bandwidth) / r["ours"] if bandwidth else float("nan")
                print(f"  batch {r['batch']:3d}: decode {r['batch'] / r['ours']:9.1f} tokens/s, "
                      f"{r['ours'] * 1e3:.2f} ms/step, roofline fraction {frac:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", choices=tuple(MODELS),
                        help="the model shape (random weights) (default: %(default)s)")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32,bf16",
                        help="comma-separated: fp32, bf16 (bf16 skipped where unsupported)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both processes")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="wall: elapsed time; cpu: this process's CPU time, which time slices "
                             "lost to other work on a loaded machine do not inflate (meaningful "
                             "with --threads 1: with more, waiting threads may spin)")
    parser.add_argument("--pair", action="store_true",
                        help="also time the ReMax pair against two separate calls")
    parser.add_argument("--cuda-graph", default="on", choices=("on", "off"),
                        help="on a GPU: our decode step replayed as one CUDA graph (on), or "
                             "eager (off) (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny model, batches 1,2, 8+8 tokens, 1 repeat, fp32")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.hf_worker:
        return hf_worker(args)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.batches, args.prompt_len, args.new_tokens, args.repeats = "1,2", 8, 8, 1
        args.dtype = "fp32"
    for name in args.dtype.split(","):
        if name not in TARGETS:
            parser.error(f"--dtype {name}: use fp32 and/or bf16")
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
