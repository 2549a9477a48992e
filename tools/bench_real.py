"""The paper's comparison on a real pretrained model (tools/bench_algorithms.py --model smollm2):
SmolLM2-135M-Instruct on the examples/smollm2 task, every algorithm with the same prompts per
step, steps, lengths and held-out evaluation, each in its own process.

Per algorithm: held-out greedy accuracy against steps and against wall-clock, seconds per step
by stage, model-state bytes (parameters + gradients + optimizer states of every model) and peak
RSS; and, at the initial weights, the gradient variance of ReMax against REINFORCE's (the
paper's variance claim, on a model whose greedy answer means something).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(EXAMPLE))

# (label, algorithm, samples per prompt, the example config whose settings it takes)
RUNS = [("remax", "remax", 1, "remax.yaml"), ("remax_n4", "remax", 4, "remax.yaml"),
        ("grpo_n4", "grpo", 4, "grpo.yaml"), ("rloo_n4", "rloo", 4, "remax.yaml"),
        ("reinforce", "reinforce", 1, "remax.yaml"), ("ppo", "ppo", 1, "remax.yaml")]
VARIANCE = [("reinforce", "reinforce", 1), ("remax", "remax", 1)]
TASKS = ("largest",)
REINFORCE_FAMILY = {"remax", "reinforce", "rloo"}  # the same options (README: Algorithms)

# the same budget for every run: `samples` sampled responses per step (n = 1: that many prompts;
# n = 4: a quarter), as the example configs do
FULL = dict(steps=16, samples=32, micro_batch=8, new_tokens=16, eval_prompts=128, eval_every=8,
            variance_rollouts=6, variance_batch=16, train_questions=1024)
QUICK = dict(steps=1, samples=4, micro_batch=4, new_tokens=2, eval_prompts=2, eval_every=1,
             variance_rollouts=2, variance_batch=2, train_questions=16)


def prepare(work: Path, s: dict, model_dir: Path, seed: int = 0) -> dict:
    """The converted model (tools/prepare_smollm2.py's output, made once) and the task's files."""
    import prepare_smollm2
    import task

    mcore = model_dir / "mcore"
    if not (mcore / "remax_checkpoint.json").is_file():
        print(f"preparing SmolLM2-135M-Instruct into {model_dir} (once) ...", flush=True)
        prepare_smollm2.prepare(model_dir)
    data = work / "data"
    task.make_data(data, s["train_questions"], s["eval_prompts"], seed)
    return {"mcore": str(mcore), "train": str(data / "train.jsonl"),
            "eval": str(data / "eval.jsonl")}


def overrides(label: str, algorithm: str, n: int, s: dict, paths: dict, work: Path) -> list:
    batch = max(1, s["samples"] // n)  # prompts
    out = [f"policy.load={paths['mcore']}", f"data.path={paths['train']}",
           f"data.eval_path={paths['eval']}", f"algorithm.name={algorithm}",
           f"rollout.n_samples={n}", f"rollout.max_new_tokens={s['new_tokens']}",
           f"train.steps={s['steps']}", f"train.global_batch_size={batch}",
           f"train.micro_batch_size={min(s['micro_batch'], batch * n)}",
           f"log.eval_every={s['eval_every']}", "log.samples_every=0", "log.tensorboard=false",
           "log.plot=false", "checkpoint.keep_last=1", f"output_dir={work / label}"]
    if algorithm == "ppo":
        out.append("critic.load=policy")  # the policy's weights with a zero head
    return out


def load_config(config: str, algorithm: str, extra: list):
    """The example config's settings; its algorithm options only for its own algorithm or one
    that reads the same options (an option an algorithm does not read is an error)."""
    from remax_megatron.config_io import load_yaml
    from remax_megatron.training.config import load_config as load

    base = load_yaml(EXAMPLE / config)
    options = dict(base.get("algorithm", {}))
    same = {options.get("name"), algorithm} <= REINFORCE_FAMILY or options.get("name") == algorithm
    base["algorithm"] = {**(options if same else {}), "name": algorithm}
    return load(None, extra, base=base)


# --- workers (one process each) --------------------------------------------------------------
def train_worker(a) -> dict:
    """The runs named by --label (comma-separated), one after the other in this process."""
    return {label: train_one(label, a) for label in a.label.split(",")}


def train_one(label: str, a) -> dict:
    from remax_megatron.training.trainer import Trainer

    s, paths = json.loads(a.settings), json.loads(a.paths)
    _, algorithm, n, config = next(run for run in RUNS if run[0] == label)
    cfg = load_config(config, algorithm, overrides(label, algorithm, n, s, paths, Path(a.work)))
    trainer = Trainer(cfg, overwrite=True)  # a scratch directory
    # the loop by hand: evaluations on the training clock's marks, and no final checkpoint
    # (a 135M model's weights and Adam states are 1.6 GB to write, which nobody reads here)
    def evaluate(clock: float) -> dict:
        e = trainer.evaluate()
        return {"step": trainer.step, "seconds": clock, "accuracy": e["eval/reward"],
                "length": e["eval/response_length"]}

    clock, history, evals = 0.0, [], [evaluate(0.0)]
    while trainer.step < s["steps"]:
        row = trainer.train_step()
        clock += row["time/step"]
        history.append(row)
        if trainer.step % s["eval_every"] == 0 or trainer.step == s["steps"]:
            evals.append(evaluate(clock))
            print(f"  {label} step {trainer.step}: accuracy {evals[-1]['accuracy']:.3f}",
                  flush=True)
    states = trainer.model_states()
    trainer.close()
    keys = ("time/step", "time/rollout", "time/reward", "time/critic", "time/train")
    timed = history[1:] or history  # the first step warms up
    return {"evals": evals, "train_reward": [row["reward/sampled"] for row in history],
            "times": {k: sum(r.get(k, 0.0) for r in timed) / len(timed) for k in keys},
            "tokens_per_s": sum(r["tokens_per_second"] for r in timed) / len(timed),
            "states": states, "training_seconds": clock,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def variance_worker(a) -> dict:
    """At the initial weights: per-batch gradients of K independent rollouts of the same
    prompts; variance = mean_k ||g_k||^2 - ||mean g||^2 (accumulated, never stacked: 135M
    parameters), and relative to ||mean g||^2."""
    import torch

    from remax_megatron.data.loader import LoaderState
    from remax_megatron.training.engine import forward_backward
    from remax_megatron.training.trainer import Trainer

    s, paths = json.loads(a.settings), json.loads(a.paths)
    out = {}
    for label, algorithm, n in VARIANCE:
        extra = overrides(f"variance_{label}", algorithm, n, {**s, "samples": s["variance_batch"] * n},
                          paths, Path(a.work))
        cfg = load_config("remax.yaml", algorithm, extra)
        trainer = Trainer(cfg, overwrite=True)
        total, squares = None, 0.0
        for k in range(s["variance_rollouts"]):
            trainer.loader.state = LoaderState()  # the same prompts every time
            trainer.step = k  # a new sampling seed: an independent rollout
            for chunk in trainer.ddp:
                chunk.zero_grad_buffer()
            exp = trainer.make_experience()
            forward_backward(trainer.ddp, exp.batches, trainer._loss, seq_length=exp.width,
                             micro_batch_size=cfg.train.micro_batch_size)
            g = torch.cat([b.grad_data.flatten().double() for chunk in trainer.ddp
                           for b in chunk.buffers])
            squares += g.pow(2).sum().item()
            total = g if total is None else total + g
            print(f"variance: {label} rollout {k + 1}/{s['variance_rollouts']}", flush=True)
        trainer.close()
        mean_sq = (total / s["variance_rollouts"]).pow(2).sum().item()
        variance = squares / s["variance_rollouts"] - mean_sq
        out[label] = {"variance": variance, "relative": variance / max(mean_sq, 1e-30)}
    return out


# --- report -----------------------------------------------------------------------------------
def report(results: dict) -> str:
    gib = 2 ** 30
    s = results["settings"]
    lines = [f"machine: {results['machine']}",
             f"SmolLM2-135M-Instruct, task {results['task']}: {s['steps']} steps x {s['samples']} "
             f"sampled responses (n = 1: as many prompts, n = 4: a quarter), {s['new_tokens']} new tokens, held-out greedy accuracy on "
             f"{s['eval_prompts']} prompts" + (" [--quick]" if results["quick"] else ""), "",
             f"{'algorithm':<11}{'acc start':>10}{'acc end':>9}{'best':>7}{'step s':>8}"
             f"{'rollout':>9}{'reward':>8}{'critic':>8}{'train':>8}{'tok/s':>8}{'peak GiB':>10}"
             "  model states GiB"]
    for label, r in results["runs"].items():
        accs = [e["accuracy"] for e in r["evals"]]
        t = r["times"]
        states = ", ".join(f"{k} {x['total'] / gib:.2f}" for k, x in r["states"].items())
        lines.append(f"{label:<11}{accs[0]:>10.3f}{accs[-1]:>9.3f}{max(accs):>7.3f}"
                     f"{t['time/step']:>8.1f}{t['time/rollout']:>9.1f}{t['time/reward']:>8.2f}"
                     f"{t['time/critic']:>8.1f}{t['time/train']:>8.1f}{r['tokens_per_s']:>8.0f}"
                     f"{r['peak_rss_gib']:>10.2f}  {states}")
    v = results["variance"]
    lines += ["", "gradient variance at the initial weights "
              f"({s['variance_batch']} prompts, {s['variance_rollouts']} rollouts):"]
    for label, x in v.items():
        lines.append(f"  {label:<10} {x['variance']:.4g} (relative {x['relative']:.3g})")
    if v["reinforce"]["variance"] > 0 and v["reinforce"]["relative"] > 0:
        lines.append(f"  ReMax / REINFORCE: {v['remax']['variance'] / v['reinforce']['variance']:.3f}"
                     f" (relative {v['remax']['relative'] / v['reinforce']['relative']:.3f})")
    else:  # every reward 0 (a --quick run): no gradient at all
        lines.append("  ReMax / REINFORCE: n/a (REINFORCE's gradients were all zero)")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5), dpi=100)
    for label, r in results["runs"].items():
        e = r["evals"]
        axes[0].plot([x["step"] for x in e], [x["accuracy"] for x in e], marker="o", label=label)
        axes[1].plot([x["seconds"] / 60 for x in e], [x["accuracy"] for x in e], marker="o",
                     label=label)
    axes[0].set(xlabel="step", ylabel="held-out greedy accuracy", title="accuracy per step")
    axes[1].set(xlabel="minutes of training", ylabel="held-out greedy accuracy",
                title="accuracy per wall-clock minute")
    labels = list(results["runs"])
    bottom = [0.0] * len(labels)
    for stage in ("rollout", "reward", "critic", "train"):
        heights = [results["runs"][k]["times"][f"time/{stage}"] for k in labels]
        axes[2].bar(labels, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes[2].set(ylabel="seconds per step", title="step time by stage")
    axes[2].tick_params(axis="x", labelsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, task {results['task']}: {results['machine']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(a, machine: str) -> int:
    from bench_algorithms import run_worker, write_results  # the shared worker launch and output

    if a.worker:
        result = {"real_train": train_worker, "real_variance": variance_worker}[a.worker](a)
        Path(a.json).write_text(json.dumps(result))
        return 0
    s = QUICK if a.quick else FULL
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine, "quick": a.quick, "task": a.task, "settings": s, "runs": {},
               "variance": {}}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        work = Path(tmp)
        paths = prepare(work, s, Path(a.smollm2_dir))
        common = ["--model", "smollm2", "--settings", json.dumps(s), "--work", str(work),
                  "--paths", json.dumps(paths)]
        # each run in its own process (its peak RSS is its own); --quick: all in one
        groups = [[label for label, *_ in RUNS]] if a.quick else [[run[0]] for run in RUNS]
        for labels in groups:
            print(f"training {', '.join(labels)} ...", flush=True)
            done = run_worker(["--worker", "real_train", "--label", ",".join(labels), *common],
                              work / "train.json")
            for label, r in done.items():
                results["runs"][label] = r
                accs = [e["accuracy"] for e in r["evals"]]
                print(f"  {label}: accuracy {accs[0]:.3f} -> {accs[-1]:.3f}, "
                      f"{r['times']['time/step']:.1f} s/step", flush=True)
        print("gradient variance at the initial weights ...", flush=True)
        results["variance"] = run_worker(["--worker", "real_variance", *common],
                                         work / "variance.json")
    return write_results(results, out, started, plot, report)
