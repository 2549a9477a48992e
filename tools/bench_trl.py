#!/usr/bin/env python
"""Our trainer against TRL, like for like: TRL's GRPOTrainer and RLOOTrainer against ours with
algorithm.name=grpo and rloo (and ReMax, which TRL does not have), on one machine.

Same everything: a GPT-2-124M-shaped policy (transformers' GPT2Config, random init, dropout off;
TRL loads the saved transformers model, ours its conversion with hf_to_mcore), GPT-2's 50257-id
vocabulary through an in-process word-level tokenizer (no download), the same 16 prompts of 64
tokens, 2 sampled responses per prompt of up to 64 new tokens (temperature 1, no top-p / top-k),
a rule reward (the share of even word ids in the response), no KL term and no reference model,
lr 1e-6 with no weight decay, gradient clipping at 1, micro-batches of 8 sequences and ONE
optimizer step per rollout. TRL runs without gradient checkpointing (its default recomputes
activations: slower and not what we do), in fp32 on a CPU and bf16 autocast on a GPU; ours in
fp32 on a CPU and bf16 with fp32 main parameters on a GPU. ReMax uses one sampled and one greedy
response per prompt (as many generated sequences as the others; it trains on the sampled one).

Each run is its own process (its peak memory is its own). TRL's side runs under ``--trl-python``
(default: this interpreter): TRL is an optional extra (`pip install -e ".[bench]"`), never a
dependency; it also works from a separate virtual environment, since the TRL worker needs only
transformers, datasets and trl (not remax_megatron):

  python tools/bench_trl.py [--steps 3] [--trl-python ../trlvenv/bin/python] [--quick]
                            [--algorithms grpo,rloo,remax] [--threads N] [--out bench-trl]

Prints seconds per step (the median of the steps after the first, wall clock of a whole step:
rollout, reward, update), the process's CPU seconds over the same steps (with --threads 1, what
load from other processes on a shared machine hardly changes), and peak memory (peak RSS on a CPU,
torch.cuda.max_memory_allocated on a GPU) of each, and the ratios ours / TRL (target: TRL's step
time >= 2x ours for GRPO and RLOO); writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL = dict(layers=12, hidden=768, heads=12, vocab=50257, prompts=16, n=2, micro_batch=8,
            prompt_len=64, new_tokens=64)
QUICK = dict(layers=2, hidden=64, heads=4, vocab=512, prompts=4, n=2, micro_batch=4,
             prompt_len=8, new_tokens=8)
LR = 1e-6
SEED = 1234
ALGORITHMS = ("grpo", "rloo", "remax")  # TRL has GRPO and RLOO


def even_share(prompts, completions, **kwargs):
    """The rule reward, for both frameworks: the share of the response's words ("w12") whose id
    is even. TRL calls it with keywords (and more of them), ours with (prompts, responses)."""
    out = []
    for text in completions:
        ids = [w[1:] for w in text.split() if w[:1] == "w" and w[1:].isdigit()]
        out.append(sum(int(i) % 2 == 0 for i in ids) / len(ids) if ids else 0.0)
    return out


# --- preparation (this interpreter: needs remax_megatron) ---------------------------------------
def prepare(prep: Path, s: dict) -> None:
    """The transformers policy and its tokenizer (for TRL), their conversion (for us), prompts."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from remax_megatron import tiny
    from remax_megatron.convert.commands import hf_to_mcore

    tokenizer = tiny.build_word_tokenizer(s["vocab"])
    config = transformers.GPT2Config(
        vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
        n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(SEED)
    model = transformers.GPT2LMHeadModel(config).eval()
    tiny.save_hf(model, tokenizer, prep / "policy_hf")
    hf_to_mcore(prep / "policy_hf", prep / "policy")
    g = torch.Generator().manual_seed(0)
    with open(prep / "prompts.jsonl", "w") as f:
        for _ in range(s["prompts"]):
            ids = torch.randint(2, s["vocab"] - 1, (s["prompt_len"],), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids)}) + "\n")


# --- workers (one process each) ------------------------------------------------------------------
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cpu_seconds() -> float:
    """CPU time of this process so far, all its threads (user + system)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_gib() -> dict:
    import resource

    import torch

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
           "load_average": os.getloadavg()[0]}
    if torch.cuda.is_available():
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def ours_worker(a, s: dict, prep: Path) -> dict:
    """Our Trainer for a.steps steps, each step timed around train_step (wall clock)."""
    sys.path.insert(0, str(ROOT))
    from remax_megatron.training.config import load_config
    from remax_megatron.training.trainer import Trainer

    remax = a.algorithm == "remax"
    kl = {"grpo": {"kl_loss_coef": 0.0}}.get(a.algorithm, {"kl_coef": 0.0})
    cfg = load_config(None, [], base={
        "policy": {"load": str(prep / "policy")},
        "reward": {"rule": f"{Path(__file__).resolve()}:even_share"},
        "data": {"path": str(prep / "prompts.jsonl"), "max_prompt_length": s["prompt_len"],
                 "shuffle": False},
        "rollout": {"max_new_tokens": s["new_tokens"], "n_samples": 1 if remax else s["n"],
                    "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "algorithm": {"name": a.algorithm, **kl},
        "train": {"steps": a.steps, "global_batch_size": s["prompts"],
                  "micro_batch_size": s["micro_batch"], "lr": LR, "weight_decay": 0.0,
                  "clip_grad": 1.0, "seed": SEED},
        "log": {"tensorboard": False, "plot": False, "samples_every": 0},
        "output_dir": str(Path(a.work) / f"ours_{a.algorithm}"),
    })
    trainer = Trainer(cfg, overwrite=True)  # a scratch directory
    steps, cpu, rows = [], [], []
    for _ in range(a.steps):
        _sync()
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        rows.append(trainer.train_step())
        _sync()
        steps.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - start_cpu)
    trainer.close()
    stages = {k: statistics.median(r[k] for r in rows[1:] or rows)
              for k in ("time/rollout", "time/reward", "time/train")}
    return {"step_seconds": steps, "step_cpu_seconds": cpu, "stages": stages,
            "reward": [r["reward/sampled"] for r in rows],
            "response_length": [r["response_length/sampled"] for r in rows], **_peak_gib()}


def trl_worker(a, s: dict, prep: Path) -> dict:
    """TRL's GRPOTrainer / RLOOTrainer for a.steps optimizer steps, each step timed from one
    on_step_end to the next (the first from on_train_begin): generation, reward and update."""
    import torch
    import transformers
    import trl
    from datasets import Dataset

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.last, self.steps, self.cpu = None, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            _sync()
            self.last = (time.perf_counter(), _cpu_seconds())

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            now = (time.perf_counter(), _cpu_seconds())
            self.steps.append(now[0] - self.last[0])
            self.cpu.append(now[1] - self.last[1])
            self.last = now

    cuda = torch.cuda.is_available()
    tokenizer = transformers.AutoTokenizer.from_pretrained(prep / "policy_hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(prep / "policy_hf",
                                                              dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in
               (prep / "prompts.jsonl").read_text().splitlines()]
    sequences = s["prompts"] * s["n"]
    common = dict(
        output_dir=str(Path(a.work) / f"trl_{a.algorithm}"), max_steps=a.steps,
        per_device_train_batch_size=s["micro_batch"],
        gradient_accumulation_steps=sequences // s["micro_batch"],  # one generation per step
        num_generations=s["n"], max_completion_length=s["new_tokens"], temperature=1.0,
        top_p=1.0, top_k=0, learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", beta=0.0, num_iterations=1, gradient_checkpointing=False,
        bf16=cuda, fp16=False, use_cpu=not cuda, logging_steps=1, save_strategy="no",
        report_to="none", seed=SEED, dataloader_num_workers=0, disable_tqdm=True)
    if a.algorithm == "grpo":
        # our GRPO: per-group std scaling and each response's token mean (TRL's "grpo" loss)
        args = trl.GRPOConfig(**common, loss_type="grpo", scale_rewards="group")
        cls = trl.GRPOTrainer
    else:
        args = trl.RLOOConfig(**common)
        cls = trl.RLOOTrainer
    timer = Timer()
    trainer = cls(model=model, reward_funcs=even_share, args=args, processing_class=tokenizer,
                  train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                  callbacks=[timer])
    trainer.train()
    history = [h for h in trainer.state.log_history if "reward" in h]
    return {"step_seconds": timer.steps, "step_cpu_seconds": timer.cpu, "trl": trl.__version__,
            "transformers": transformers.__version__,
            "reward": [h["reward"] for h in history],
            "response_length": [h.get("completions/mean_length") for h in history], **_peak_gib()}


# --- orchestration -------------------------------------------------------------------------------
def run_worker(python: str, args: list[str], out: Path, env: dict) -> dict:
    proc = subprocess.run([python, __file__, *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(args[:4])} ({python}) failed:\n{proc.stdout[-2000:]}\n"
                 f"{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def has_trl(python: str) -> str | None:
    """TRL's version under ``python``, or None."""
    proc = subprocess.run([python, "-c", "import trl; print(trl.__version__)"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def machine(threads: int = 0) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"{threads or torch.get_num_threads()} torch thread(s) per run, torch {torch.__version__}")


def summary(result: dict) -> dict:
    def later(values):
        return statistics.median(values[1:] or values)

    peak = result.get("cuda_max_allocated_gib", result["peak_rss_gib"])
    return {"median_s": later(result["step_seconds"]), "first_s": result["step_seconds"][0],
            "median_cpu_s": later(result["step_cpu_seconds"]), "peak_gib": peak}


def report(results: dict) -> str:
    gpu = "cuda" in results["machine"].lower()
    peak = "peak GiB (" + ("CUDA alloc." if gpu else "RSS") + ")"
    lines = [f"machine: {results['machine']}",
             f"settings: {results['settings']}, {results['steps']} steps each",
             f"TRL: {results.get('trl_version') or 'not installed under ' + results['trl_python']}",
             "",
             f"{'run':<12}{'s/step':>8}{'CPU s/step':>12}{'first step s':>14}{peak:>19}"
             f"{'load avg':>10}  mean reward per step"]
    for label, r in results["runs"].items():
        x = summary(r)
        reward = ", ".join(f"{v:.3f}" for v in r["reward"])
        lines.append(f"{label:<12}{x['median_s']:>8.2f}{x['median_cpu_s']:>12.2f}"
                     f"{x['first_s']:>14.2f}{x['peak_gib']:>19.2f}{r['load_average']:>10.1f}"
                     f"  {reward}")
    lines += ["", "s/step: wall clock of a whole step (rollout + reward + update), the median of "
              "the steps after the first; CPU s/step: the process's CPU time (all threads) over "
              "the same steps, which load from other processes hardly moves with --threads 1 "
              "(load avg: the 1-minute load when the run ended)",
              "", "ours / TRL (target: TRL's step time >= 2x ours):"]
    for name, verdict in ratios(results):
        lines.append(f"  {name}: {verdict}")
    return "\n".join(lines)


def ratios(results: dict) -> list[tuple[str, str]]:
    out, runs = [], results["runs"]
    gpu = "cuda" in results["machine"].lower()
    for algorithm in ("grpo", "rloo"):
        ours, theirs = runs.get(f"ours {algorithm}"), runs.get(f"TRL {algorithm}")
        if ours is None or theirs is None:
            continue
        o, t = summary(ours), summary(theirs)
        clocks = [("wall", "median_s")] + ([] if gpu else [("CPU", "median_cpu_s")])
        for clock, key in clocks:
            speed = t[key] / o[key]
            out.append((f"{algorithm} {clock} time per step",
                        f"ours {o[key]:.2f} s vs TRL {t[key]:.2f} s = {o[key] / t[key]:.2f}x "
                        f"(TRL {speed:.2f}x slower; target >= 2x: {'pass' if speed >= 2 else 'MISS'})"))
        out.append((f"{algorithm} peak memory", f"ours {o['peak_gib']:.2f} GiB vs TRL "
                    f"{t['peak_gib']:.2f} GiB = {o['peak_gib'] / t['peak_gib']:.2f}x"))
    if "ours remax" in runs and "TRL rloo" in runs:
        o, t = summary(runs["ours remax"]), summary(runs["TRL rloo"])
        out.append(("ReMax (ours) / TRL RLOO (not like for like)",
                    f"wall {o['median_s'] / t['median_s']:.2f}x, CPU "
                    f"{o['median_cpu_s'] / t['median_cpu_s']:.2f}x, memory "
                    f"{o['peak_gib'] / t['peak_gib']:.2f}x"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (>= 2; the "
                   "first is not timed) (default: %(default)s)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="of grpo,rloo,remax (default: %(default)s)")
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", sys.executable),
                   help="the interpreter with trl installed (default: $TRL_PYTHON or this one); "
                        "without TRL only our runs are timed")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of every run (0: torch's default). On a machine shared with "
                        "other work, 1: multi-threaded CPU kernels wait at every barrier for a "
                        "descheduled thread, which distorts wall and CPU time alike")
    p.add_argument("--quick", action="store_true", help="a tiny model and batch (a smoke run)")
    p.add_argument("--out", default="bench-trl", help="where results.json goes")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    for hidden in ("--algorithm", "--prep", "--work", "--settings", "--json"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        worker = ours_worker if a.worker == "ours" else trl_worker
        result = worker(a, json.loads(a.settings), Path(a.prep))
        Path(a.json).write_text(json.dumps(result))
        return 0

    algorithms = [x for x in a.algorithms.split(",") if x]
    unknown = set(algorithms) - set(ALGORITHMS)
    if unknown or a.steps < 2:
        p.error(f"--algorithms takes {','.join(ALGORITHMS)}; --steps must be >= 2")
    s = QUICK if a.quick else FULL
    trl_version = has_trl(a.trl_python)
    if trl_version is None:
        print(f"TRL is not importable under {a.trl_python}: timing ours only (install the bench "
              "extra, or pass --trl-python)", flush=True)
    results = {"machine": machine(a.threads), "settings": s, "steps": a.steps, "quick": a.quick,
               "trl_python": a.trl_python, "trl_version": trl_version, "runs": {}}
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        work, prep = Path(tmp), Path(tmp) / "prep"
        print(f"preparing the GPT-2-shaped policy ({s['layers']} layers, hidden {s['hidden']}, "
              f"vocab {s['vocab']}) ...", flush=True)
        prepare(prep, s)
        common = ["--settings", json.dumps(s), "--prep", str(prep), "--work", str(work),
                  "--steps", str(a.steps), "--threads", str(a.threads)]
        # each pair back to back, so that a change of load on a shared machine hits both alike
        plan = []
        for x in algorithms:
            if x != "remax" and trl_version:
                plan.append(("TRL", "trl", x, a.trl_python))
            plan.append(("ours", "ours", x, sys.executable))
        for framework, worker, algorithm, python in plan:
            label = f"{framework} {algorithm}"
            print(f"timing {label} ...", flush=True)
            results["runs"][label] = run_worker(
                python, ["--worker", worker, "--algorithm", algorithm, *common], work /
                f"{worker}_{algorithm}.json", env)
            x = summary(results["runs"][label])
            print(f"  {x['median_s']:.2f} s/step, {x['median_cpu_s']:.2f} CPU s/step", flush=True)
    results["seconds"] = time.time() - started
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    print(f"\nwrote {out / 'results.json'} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
