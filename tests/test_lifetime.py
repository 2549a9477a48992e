"""No helper process outlives the process that started it (runtime/lifetime.py), even on kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import ROOT, _free_port, worker_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="parent-death signals are Linux-only")

DEMO = ["-m", "remax_megatron", "train", "train.steps=400", "checkpoint.save_every=2"]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_dead(procs: list[psutil.Process], seconds: float = 10.0) -> list[psutil.Process]:
    deadline = time.time() + seconds
    while (alive := _alive(procs)) and time.time() < deadline:
        time.sleep(0.1)
    return alive


def _kill_all(procs: list[psutil.Process]) -> None:
    """Test cleanup, so that a failing run leaves nothing behind either."""
    for p in _alive(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _kill_after_first_checkpoint(cmd: list[str], out, env: dict, workers: int = 0) -> None:
    """Run ``cmd`` (a trainer, or a launcher of ``workers`` trainers), wait for its first
    checkpoint (megatron's results-queue manager then exists: a forked copy of each trainer),
    kill -9 the launched process and check that every descendant dies within a few seconds."""
    log = out.parent / "log.txt"  # a file, not a pipe nobody drains while it runs
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    top = psutil.Process(proc.pid)
    descendants: list[psutil.Process] = []
    try:
        latest = out / "checkpoints" / "latest"
        deadline = time.time() + 120
        while not latest.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if not latest.exists():
            proc.kill()
            pytest.fail(f"no checkpoint was saved (rc {proc.wait()}):\n{log.read_text()[-4000:]}")
        descendants = top.children(recursive=True)
        names = [" ".join(p.cmdline())[:120] for p in _alive(descendants)]
        assert len(names) > workers, names  # megatron's helper exists beside the trainers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        survivors = _wait_dead(descendants)
        assert not survivors, [(p.pid, " ".join(p.cmdline())[:120]) for p in survivors]
    finally:
        _kill_all([top, *descendants])
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_single_process_kill9_leaves_no_helper(tmp_path):
    out = tmp_path / "run"
    _kill_after_first_checkpoint([sys.executable, *DEMO, "--output-dir", str(out)], out,
                                 worker_env())


@pytest.mark.distributed
def test_torchrun_launcher_kill9_leaves_no_worker(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           *DEMO, "--output-dir", str(out)]
    env = worker_env()
    env["CUDA_VISIBLE_DEVICES"] = ""  # two gloo ranks on the CPU
    _kill_after_first_checkpoint(cmd, out, env, workers=2)


# Without megatron: a forked child, a spawned (fork + exec) multiprocessing child and a
# grandchild forked by the spawned one, all under a parent that is then killed.
FAMILY = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from remax_megatron.runtime import lifetime

    def grandparent():
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        time.sleep(600)

    if __name__ == "__main__":
        lifetime.install()
        lifetime.install()  # idempotent
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        mp.get_context("spawn").Process(target=grandparent, daemon=False).start()
        print("ready", flush=True)
        time.sleep(600)
""")


def test_forked_and_spawned_children_die_with_parent(tmp_path):
    script = tmp_path / "family.py"
    script.write_text(FAMILY)
    proc = subprocess.Popen([sys.executable, str(script)], env=worker_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    top = psutil.Process(proc.pid)
    family: list[psutil.Process] = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 30
        while len(family := top.children(recursive=True)) < 4 and time.time() < deadline:
            time.sleep(0.1)  # forked child, resource tracker, spawned child, its child
        assert len(family) >= 4, [" ".join(p.cmdline()) for p in family]
        cmdlines = [" ".join(p.cmdline()) for p in family]
        guarded = [c for c in cmdlines if "_adopt(" in c]  # the spawned child and its fork
        assert guarded and all(c.count("_adopt(") == 1 for c in guarded), cmdlines  # not twice
        proc.kill()
        proc.wait()
        survivors = _wait_dead(family, 5)
        assert not survivors, [" ".join(p.cmdline()) for p in survivors]
    finally:
        _kill_all([top, *family])
        proc.communicate()


THREAD_FORK = textwrap.dedent("""
    import os, threading, time
    from remax_megatron.runtime import lifetime

    lifetime.install()
    pids = []
    def fork():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the at-fork hook has run by now
            os.write(w, b"x")
            time.sleep(1.5)  # outlives the thread that forked it
            os._exit(7)
        os.read(r, 1)  # the thread ends only after the child's hook (else no signal is due)
        pids.append(pid)
    t = threading.Thread(target=fork)
    t.start()
    t.join()
    _, status = os.waitpid(pids[0], 0)
    print(os.waitstatus_to_exitcode(status))
""")


def test_fork_from_a_short_lived_thread_is_not_killed_when_it_ends():
    proc = subprocess.run([sys.executable, "-c", THREAD_FORK], env=worker_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "7"  # not -9: PDEATHSIG would have fired at the thread's end


def test_install_is_a_noop_off_linux(monkeypatch):
    from multiprocessing import spawn

    from remax_megatron.runtime import lifetime

    before = spawn.get_command_line
    monkeypatch.setattr(lifetime.sys, "platform", "darwin")
    monkeypatch.setattr(lifetime, "_installed", False)
    monkeypatch.setattr(lifetime.os, "register_at_fork", None)  # would raise if called
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    lifetime.install()
    assert spawn.get_command_line is before and not lifetime._installed
