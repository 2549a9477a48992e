"""Multi-node launches on one machine (two torchrun agents joined by a rendezvous on localhost),
and the faults of a long run: a rank killed, a rank hung.

* examples/llama2_7b/launch_multinode.sh, run as on two nodes of one rank each (dp2 across the
  nodes, static rendezvous on MASTER_ADDR), logs the one-node dp2 run's metrics exactly;
* a rank killed (kill -9) after a checkpoint, or while one is being saved, under
  `torchrun --max-restarts` with `--resume auto`: the restarted workers resume from the newest
  complete checkpoint and end with the uninterrupted run's metrics and weights;
* a rank stopped (SIGSTOP) ends every rank within parallel.timeout_minutes, with one line
  naming the silent rank and what it was doing;
* two agents of two ranks each joined by a c10d rendezvous (tp2 inside each node, dp2 across)
  log the one-node tp2 x dp2 run's metrics exactly;
* the launch script and the SLURM script, with the cluster's variables faked and torchrun
  replaced by a recorder, give the torchrun command a real cluster would run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, _free_port, run_metrics, run_torchrun, torchrun_command, worker_env

pytestmark = pytest.mark.distributed

TINY = ["train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=4",
        "rollout.max_new_tokens=4", "log.tensorboard=false", "log.plot=false",
        "checkpoint.save_every=2", "checkpoint.keep_last=0"]
# what a run logs that depends on the machine, not on the computation
TIMING = ("time/", "memory/", "per_second")


def computed(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)}
            for row in run_metrics(run)]


def agents(commands: list[list[str]], env: dict, timeout: float = 420) -> None:
    """Start every agent at once (as on separate nodes) and wait for all of them."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in commands]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]


def cpu_env(**extra) -> dict:
    env = worker_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory) -> Path:
    """The built-in demo as a config file (what a cluster job would be given)."""
    path = tmp_path_factory.mktemp("config") / "demo.yaml"
    out = subprocess.run([sys.executable, "-m", "remax_megatron", "train", "--print-config"],
                         env=worker_env(), cwd=ROOT, capture_output=True, text=True, check=True)
    path.write_text(out.stdout)
    return path


@pytest.fixture(scope="module")
def one_node_dp2(demo_config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one_node") / "run"
    run_torchrun(2, ["-m", "remax_megatron", "train", "--config", str(demo_config),
                     "--output-dir", str(run), *TINY])
    return run


def final_weights(run: Path) -> dict:
    """The final checkpoint's weight shards by their checksums (equal bytes, equal weights; the
    index, .metadata, names the host that wrote it)."""
    listed = json.loads((run / "checkpoints" / "step_000004" / "checksums.json").read_text())
    shards = {name: crc for name, crc in listed["files"].items()
              if name.startswith("model/") and name.endswith(".distcp")}
    assert shards
    return shards


def test_launch_script_on_two_nodes_logs_the_one_node_dp2_metrics(one_node_dp2, demo_config,
                                                                  tmp_path):
    two_nodes = tmp_path / "two_nodes"
    script = ROOT / "examples" / "llama2_7b" / "launch_multinode.sh"
    env = cpu_env(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                  GPUS_PER_NODE="1", CONFIG=str(demo_config))
    procs = [["env", f"NODE_RANK={rank}", "bash", str(script), f"output_dir={two_nodes}", *TINY]
             for rank in (0, 1)]
    agents(procs, env)
    assert [row["step"] for row in run_metrics(two_nodes)] == [1, 2, 3, 4]
    assert computed(two_nodes) == computed(one_node_dp2)
    assert final_weights(two_nodes) == final_weights(one_node_dp2)


def worker_pid(agent: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker of global rank ``rank`` that ``agent`` (torchrun) started."""
    for child in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def complete(run: Path, step: int) -> bool:
    return (run / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").is_file()


@pytest.mark.parametrize("when", ["after_checkpoint", "during_save"])
def test_a_killed_rank_restarts_and_ends_as_the_uninterrupted_run(one_node_dp2, demo_config,
                                                                  tmp_path, when):
    """kill -9 of rank 1 after the step-2 checkpoint (or while step 4's is being written):
    torchrun restarts both workers, which resume from step 2 and end as if never stopped."""
    run = tmp_path / "run"
    cmd, env = torchrun_command(2, ["--max-restarts", "1", "-m", "remax_megatron", "train",
                                    "--config", str(demo_config), "--output-dir", str(run),
                                    "--resume", "auto", *TINY])
    agent = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        if when == "after_checkpoint":
            wait_for(lambda: complete(run, 2), 300, "the step-2 checkpoint")
        else:
            wait_for(lambda: (run / "checkpoints" / ".step_000004.tmp").exists(), 300,
                     "the step-4 save to begin")
        os.kill(worker_pid(agent, 1), signal.SIGKILL)
        out = agent.communicate(timeout=420)[0]
    finally:
        agent.kill()
    assert agent.returncode == 0, out[-4000:]
    assert "resumed from" in out and "step_000002" in out, out[-4000:]
    assert computed(run) == computed(one_node_dp2)
    assert final_weights(run) == final_weights(one_node_dp2)


def test_a_hung_rank_ends_the_run_with_one_line_naming_it(demo_config, tmp_path):
    run = tmp_path / "run"
    cmd, env = torchrun_command(2, ["-m", "remax_megatron", "train", "--config",
                                    str(demo_config), "--output-dir", str(run), *TINY,
                                    "train.steps=50", "parallel.timeout_minutes=0.1"])
    agent = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    stopped, lines, took = None, [], None
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file(), 300, "the first step")
        stopped = worker_pid(agent, 1)
        os.kill(stopped, signal.SIGSTOP)
        start = time.time()
        for line in agent.stdout:
            lines.append(line)
            if "train: error" in line and took is None:
                took = time.time() - start
                os.kill(stopped, signal.SIGKILL)  # else torchrun waits 30 s to kill it
            assert time.time() - start < 120, "".join(lines[-50:])
        agent.wait(timeout=60)
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        agent.kill()
    out = "".join(lines)
    assert agent.returncode != 0
    lines = [line for line in out.splitlines() if "train: error" in line]
    assert len(lines) == 1, out[-4000:]
    assert re.search(r"rank 0 waited parallel.timeout_minutes=0.1 in (rollout|reward|update|save)"
                     r" of step \d+ for another rank: rank 1 \(pid \d+ on .*\) silent for \d+ s,"
                     r" last in (rollout|reward|update|save) of step \d+", lines[0]), lines[0]
    assert took < 30, f"the error came {took:.0f} s after the rank stopped (timeout 6 s)"


def test_c10d_rendezvous_tp2_inside_nodes_dp2_across(demo_config, tmp_path):
    args = ["-m", "remax_megatron", "train", "--config", str(demo_config), *TINY,
            "train.steps=2", "parallel.tp=2"]
    one_node = tmp_path / "one_node"
    run_torchrun(4, [*args, "--output-dir", str(one_node)])
    two_nodes = tmp_path / "two_nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
             "--rdzv-id", "remax-test", *args, "--output-dir", str(two_nodes)]
    agents([agent, agent], cpu_env())
    assert computed(two_nodes) == computed(one_node)


def recorder(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_cluster(tmp_path) -> tuple[Path, dict]:
    """torchrun, scontrol and srun replaced: torchrun appends its arguments (one JSON list per
    call) to a log; srun runs its command once per node with that node's SLURM variables."""
    bin_dir, log = tmp_path / "bin", tmp_path / "torchrun.jsonl"
    bin_dir.mkdir()
    recorder(bin_dir, "torchrun", f'{sys.executable} -c "import json, sys; '
             f"open('{log}', 'a').write(json.dumps(sys.argv[1:]) + chr(10))\" \"$@\"\n")
    recorder(bin_dir, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"\n')
    recorder(bin_dir, "srun", 'shift  # --kill-on-bad-exit=1\n'
             'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@"; done\n')
    env = {**worker_env(), "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}
    return log, env


def expected(node: int, addr: str, port: str) -> list[str]:
    return ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "8",
            "--max-restarts", "3", "--master-addr", addr, "--master-port", port, "-m", "remax_megatron", "train",
            "--config", "examples/llama2_7b/config.yaml", "--resume", "auto"]


def test_slurm_script_gives_each_node_its_torchrun_command(fake_cluster):
    log, env = fake_cluster
    env.update(SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2")
    subprocess.run(["bash", "examples/llama2_7b/slurm.sbatch"], env=env, cwd=ROOT, check=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [expected(0, "gpu-node-07", "29500"), expected(1, "gpu-node-07", "29500")]


def test_launch_script_gives_each_node_its_torchrun_command(fake_cluster):
    log, env = fake_cluster
    for node in (0, 1):
        subprocess.run(["bash", "examples/llama2_7b/launch_multinode.sh"], cwd=ROOT, check=True,
                       env={**env, "NNODES": "2", "NODE_RANK": str(node),
                            "MASTER_ADDR": "gpu-node-07"})
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [expected(0, "gpu-node-07", "29500"), expected(1, "gpu-node-07", "29500")]
    missing = subprocess.run(["bash", "examples/llama2_7b/launch_multinode.sh"], cwd=ROOT,
                             env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "NNODES" in missing.stderr
