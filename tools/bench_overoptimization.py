#!/usr/bin/env python
"""Reward over-optimization, offline (Gao et al., "Scaling Laws for Reward Model
Overoptimization", 2022): RL against a LEARNED reward model while a gold scorer, standing in for
humans, measures what the policy really gained.

1. the policy: the demo's tiny Llama shape (random init, its built-in tokenizer), converted;
2. preference pairs: two sampled responses of the policy (`remax-megatron generate`, two seeds)
   to each of many prompts; the gold scorer (the demo's vowel share) picks the preferred one
   (ties dropped);
3. a proxy reward model: `remax-megatron train-rm` on those pairs, from the policy's backbone;
4. ReMax, PPO and GRPO (`train`, one process each) against the proxy, every algorithm with the
   same small KL coefficient; every --every steps the greedy responses to held-out prompts are
   scored by the proxy AND by the gold scorer, and the policy's KL to its reference is read.

Prints a table (gold and proxy reward at the start, the gold peak and the end, KL, wall-clock)
and writes OUT/results.json and OUT/overoptimization.png (gold and proxy against steps, and the
gold reward against sqrt(KL), Gao et al.'s axis).

  python tools/bench_overoptimization.py [--out bench-overoptimization] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_algorithms import machine, write_results  # noqa: E402 (tools/ is this script's dir)

ALGORITHMS = [("remax", 1), ("ppo", 1), ("grpo", 2)]  # (algorithm, samples per prompt)
GOLD = "remax_megatron.training.demo:vowel_share"
FULL = dict(pair_prompts=512, rm_steps=60, rm_batch=32, rl_steps=150, every=10, kl=0.01,
            lr=2e-3, new_tokens=16, eval_prompts=64)
QUICK = dict(pair_prompts=16, rm_steps=2, rm_batch=8, rl_steps=2, every=1, kl=0.01, lr=2e-3,
             new_tokens=4, eval_prompts=8)
SUFFIXES = ("", " today", " please", " now", " in one line", " briefly", " for me", " again")


def prompts() -> list[str]:
    """The demo's 64 prompts x 8 suffixes: distinct texts for pairs, training and held out."""
    from remax_megatron.training import demo

    return [p + s for s in SUFFIXES for p in demo.PROMPTS]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(args: list[str], log: Path) -> None:
    """`remax-megatron ARGS` in a fresh process (its log kept; its last lines on failure)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "remax_megatron", *args], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"remax-megatron {' '.join(args[:1])} failed:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))


# --- 1-3: the policy, the pairs, the proxy reward model ---------------------------------------------
def policy_checkpoint(work: Path) -> Path:
    from remax_megatron import tiny
    from remax_megatron.convert.commands import hf_to_mcore
    from remax_megatron.training import demo

    tokenizer = demo.tokenizer()
    m = demo.config()["policy"]["model"]
    model = tiny.build_hf_model("LlamaForCausalLM", len(tokenizer), seed=0,
                                num_hidden_layers=m["num_layers"], hidden_size=m["hidden_size"],
                                intermediate_size=m["ffn_hidden_size"],
                                num_attention_heads=m["num_attention_heads"],
                                num_key_value_heads=m["num_key_value_heads"],
                                max_position_embeddings=m["max_position_embeddings"],
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    return hf_to_mcore(tiny.save_hf(model, tokenizer, work / "policy_hf"), work / "policy")


def preference_pairs(work: Path, policy: Path, texts: list[str], s: dict) -> tuple[str, str]:
    """Two sampled responses per prompt, the gold scorer's preferred one as "chosen"; 1/8 of
    the pairs held out (the proxy's accuracy)."""
    from remax_megatron.training import demo

    source = write_jsonl(work / "pair_prompts.jsonl", [{"prompt": t} for t in texts])
    sides = []
    for seed in (1, 2):
        out = work / f"samples_{seed}.jsonl"
        cli(["generate", "--load", str(policy), "--input", source, "--output", str(out),
             "--temperature", "1.0", "--top-p", "1.0", "--seed", str(seed),
             "--max-new-tokens", str(s["new_tokens"])], work / f"generate_{seed}.log")
        sides.append([json.loads(line) for line in out.open()])
    pairs = []
    for a, b in zip(*sides):
        ga, gb = demo.vowel_share([], [a["response"], b["response"]])
        if ga != gb and a["response"].strip() and b["response"].strip():
            win, lose = (a, b) if ga > gb else (b, a)
            pairs.append({"prompt": a["prompt"], "chosen": win["response"],
                          "rejected": lose["response"]})
    held = max(1, len(pairs) // 8)
    return (write_jsonl(work / "pairs.jsonl", pairs[held:]),
            write_jsonl(work / "pairs_eval.jsonl", pairs[:held]))


def proxy_reward_model(work: Path, policy: Path, pairs: str, held: str, s: dict) -> dict:
    cli(["train-rm", f"policy.load={policy}", f"data.path={pairs}", f"data.eval_path={held}",
         f"train.steps={s['rm_steps']}", f"train.global_batch_size={s['rm_batch']}",
         "train.micro_batch_size=8", "train.lr=3e-3", "train.weight_decay=0.0",
         f"log.eval_every={max(1, s['rm_steps'] // 4)}", "log.tensorboard=false",
         f"output_dir={work / 'proxy'}"], work / "train_rm.log")
    return [json.loads(line) for line in (work / "proxy" / "eval.jsonl").open()][-1]


# --- 4: RL against the proxy, measured by the gold scorer (one process per algorithm) ---------------
class GoldAlongside:
    """The proxy's scores, with the gold scorer's of the same responses kept in ``scores``."""

    def __init__(self, proxy, gold):
        self.proxy, self.gold, self.scores = proxy, gold, []
        self.collective = proxy.collective

    def score(self, items):
        self.scores += self.gold.score(items).tolist()
        return self.proxy.score(items)


def rl_worker(a) -> dict:
    from remax_megatron.reward.rule import RuleReward
    from remax_megatron.training import demo
    from remax_megatron.training.config import load_config
    from remax_megatron.training.trainer import Trainer

    s = json.loads(a.settings)
    kl = {("kl_loss_coef" if a.algorithm == "grpo" else "kl_coef"): s["kl"]}
    base = demo.config()
    cfg = load_config(None, [], base={
        "policy": {"load": a.policy}, "reward": {"load": a.proxy},
        "data": {"path": a.prompts, "eval_path": a.eval_prompts, "max_prompt_length": 32},
        "rollout": {**base["rollout"], "max_new_tokens": s["new_tokens"], "n_samples": a.n},
        "algorithm": {"name": a.algorithm, **kl},
        "train": {**base["train"], "steps": s["rl_steps"], "lr": s["lr"]},
        "log": {"tensorboard": False, "plot": False, "samples_every": 0},
        "output_dir": a.work})
    trainer = Trainer(cfg, overwrite=True)  # a scratch directory
    gold = GoldAlongside(trainer.reward, RuleReward(GOLD, probe_prompts=["probe"]))

    def measure(step: int, clock: float, kl_value: float) -> dict:
        """Greedy responses to the held-out prompts, scored by the proxy (the run's reward) and
        by the gold scorer: the same responses (one process: no reduction needed)."""
        trainer.reward, gold.scores = gold, []
        proxy = trainer.evaluate()
        trainer.reward = gold.proxy
        row = {"step": step, "seconds": clock, "kl": kl_value, "proxy": proxy["eval/reward"],
               "gold": sum(gold.scores) / max(len(gold.scores), 1),
               "length": proxy["eval/response_length"]}
        print(f"{a.algorithm} step {step}: proxy {row['proxy']:+.4f} gold {row['gold']:.4f} "
              f"kl {kl_value:.4f} length {row['length']:.1f}", flush=True)
        return row

    rows, clock = [measure(0, 0.0, 0.0)], 0.0
    while trainer.step < s["rl_steps"]:
        m = trainer.train_step()
        clock += m["time/step"]
        if trainer.step % s["every"] == 0 or trainer.step == s["rl_steps"]:
            rows.append(measure(trainer.step, clock, m["kl"]))
    trainer.close()
    return {"rows": rows}


def run_worker(args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, *args, "--json", str(out)], cwd=ROOT,
                          env=env, text=True, stdout=None, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(args[:4])} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


# --- the report --------------------------------------------------------------------------------
def summary(rows: list[dict]) -> dict:
    peak = max(rows, key=lambda r: r["gold"])
    return {"gold_start": rows[0]["gold"], "gold_peak": peak["gold"], "peak_step": peak["step"],
            "gold_end": rows[-1]["gold"], "proxy_start": rows[0]["proxy"],
            "proxy_end": rows[-1]["proxy"], "kl_end": rows[-1]["kl"],
            "seconds": rows[-1]["seconds"]}


def report(results: dict) -> str:
    lines = [f"machine: {results['machine']}; proxy reward model: held-out accuracy "
             f"{results['proxy']['eval/accuracy']:.3f} on {results['proxy']['eval/pairs']} "
             f"pairs ({results['pairs']} training pairs)",
             "", "| algorithm | proxy start -> end | gold start | gold peak (step) | gold end | "
             "KL end | seconds |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in results["runs"].items():
        m = summary(run["rows"])
        lines.append(f"| {name} | {m['proxy_start']:+.3f} -> {m['proxy_end']:+.3f} | "
                     f"{m['gold_start']:.3f} | {m['gold_peak']:.3f} ({m['peak_step']}) | "
                     f"{m['gold_end']:.3f} | {m['kl_end']:.4f} | {m['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_kl) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for index, (name, run) in enumerate(results["runs"].items()):
        rows, color = run["rows"], f"C{index}"
        steps = [r["step"] for r in rows]
        by_step.plot(steps, [r["gold"] for r in rows], color=color, label=f"{name}: gold")
        by_step.plot(steps, [r["proxy"] for r in rows], color=color, linestyle="--",
                     label=f"{name}: proxy")
        by_kl.plot([max(r["kl"], 0.0) ** 0.5 for r in rows], [r["gold"] for r in rows],
                   color=color, marker="o", markersize=3, label=name)
    by_step.set(xlabel="RL step", ylabel="reward of greedy held-out responses",
                title="gold (solid) and proxy (dashed) reward")
    by_kl.set(xlabel="sqrt(KL to the reference), per token", ylabel="gold reward",
              title="gold reward against the distance travelled")
    for ax in (by_step, by_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-overoptimization", help="results.json and the PNG")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--algorithm", "--policy", "--proxy", "--prompts", "--eval-prompts", "--work",
                   "--settings", "--json"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        Path(a.json).write_text(json.dumps(rl_worker(a)))
        return 0
    s = QUICK if a.quick else FULL
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    texts = prompts()
    rl_texts = texts[:64]  # the demo's own prompts
    held_out = texts[64:64 + s["eval_prompts"]]
    pair_texts = texts[64 + s["eval_prompts"]:][:s["pair_prompts"]]
    results = {"machine": machine(), "quick": a.quick, "settings": s, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-overopt-") as tmp:
        work = Path(tmp)
        print("policy and preference pairs ...", flush=True)
        policy = policy_checkpoint(work)
        pairs, held = preference_pairs(work, policy, pair_texts, s)
        results["pairs"] = sum(1 for _ in open(pairs))
        print(f"proxy reward model on {results['pairs']} pairs ...", flush=True)
        results["proxy"] = proxy_reward_model(work, policy, pairs, held, s)
        rl = write_jsonl(work / "rl_prompts.jsonl", [{"prompt": t} for t in rl_texts])
        evals = write_jsonl(work / "eval_prompts.jsonl", [{"prompt": t} for t in held_out])
        for algorithm, n in ALGORITHMS:
            print(f"{algorithm} against the proxy ...", flush=True)
            results["runs"][algorithm] = run_worker(
                ["--worker", "--algorithm", algorithm, "--n", str(n), "--policy", str(policy),
                 "--proxy", str(work / "proxy"), "--prompts", rl, "--eval-prompts", evals,
                 "--work", str(work / algorithm), "--settings", json.dumps(s)],
                work / f"{algorithm}.json")
    return write_results(results, out, started, plot, report, "overoptimization.png")


if __name__ == "__main__":
    sys.exit(main())
