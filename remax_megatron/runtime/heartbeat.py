"""Which rank stopped answering, and what it was doing: for a run that would otherwise hang.

Every rank of a torchrun job beats into the job's key-value store (its own client, a daemon
thread, every BEAT_SECONDS): the time, and the phase and step the rank is in (rollout, reward,
update, evaluate, save). A rank that is stopped (SIGSTOP), frozen, or stuck outside a collective
stops beating. A rank that waits longer than parallel.timeout_minutes in a collective gets
torch's timeout error; ``explain`` turns it into one line that names the ranks whose beats
stopped, with their host, pid and last phase. (A rank that dies is torchrun's to see: it stops
the others at once, or restarts the workers with --max-restarts.)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)

BEAT_SECONDS = 2.0
PREFIX = "remax/heartbeat/"
TIMEOUT_MARKS = ("timed out", "timeout")


class Heartbeat:
    def __init__(self, rank: int, world_size: int, timeout_minutes: float):
        self.rank, self.world_size = rank, world_size
        self.timeout_minutes = timeout_minutes
        self.phase, self.step = "start", 0
        self._store = _store_client() if world_size > 1 else None
        self._stop, self._wake = threading.Event(), threading.Event()
        if self._store is not None:
            self._beat()
            threading.Thread(target=self._run, name="remax-heartbeat", daemon=True).start()

    def enter(self, phase: str, step: int) -> None:
        """This rank now works on ``phase`` of step ``step`` (a beat says so at once)."""
        self.phase, self.step = phase, step
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()

    def _beat(self) -> None:
        self._store.set(f"{PREFIX}{self.rank}", json.dumps(
            [time.time(), self.phase, self.step, socket.gethostname(), os.getpid()]))

    def _run(self) -> None:
        while True:
            self._wake.wait(BEAT_SECONDS)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._beat()
            except Exception:  # the store went away (the job is ending): stop beating
                return

    def explain(self, err: BaseException) -> str | None:
        """One line for a collective that timed out (None for any other error)."""
        text = str(err).lower()
        if self._store is None or not any(mark in text for mark in TIMEOUT_MARKS):
            return None
        now = time.time()
        silent = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            beat = self._read(rank)
            if beat is None or now - beat[0] > 3 * BEAT_SECONDS:
                silent.append(_describe(rank, beat, now))
        who = ("; ".join(silent) if silent else
               "every other rank still answers, so one is stuck inside a collective "
               "(a deadlock: ranks that disagree on what comes next)")
        return (f"rank {self.rank} waited parallel.timeout_minutes={self.timeout_minutes:g} in "
                f"{self.phase} of step {self.step} for another rank: {who}; the run stops "
                "(--resume continues from the last checkpoint; raise "
                "parallel.timeout_minutes if a phase can rightly take longer)")

    def _read(self, rank: int):
        try:
            key = f"{PREFIX}{rank}"
            return json.loads(self._store.get(key)) if self._store.check([key]) else None
        except Exception:
            return None


def _describe(rank: int, beat, now: float) -> str:
    if beat is None:
        return f"rank {rank} never reported"
    at, phase, step, host, pid = beat
    return (f"rank {rank} (pid {pid} on {host}) silent for {now - at:.0f} s, last in {phase} "
            f"of step {step}")


def _store_client():
    """A client of the job's store of its own (torchrun's agent store at MASTER_ADDR:PORT), so
    the beating thread never shares a connection with the main thread."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        return dist.TCPStore(addr, int(port), is_master=False,
                             timeout=datetime.timedelta(seconds=30))
    except Exception as err:  # no heartbeat is no reason to stop a run
        log.warning("no heartbeat (cannot reach the store at %s:%s: %s): a hung rank will be "
                    "reported without its name", addr, port, err)
        return None
