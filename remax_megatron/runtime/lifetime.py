"""Helper processes die with the process that started them (Linux; a no-op elsewhere).

megatron's dist_checkpointing starts, on its first save, a ``spawn`` multiprocessing Manager
(a fresh interpreter that re-imports the entry script: ~0.27 GB; it lives until the process
exits) and, on every save, ``fork``ed writer processes. On a kill -9 of the trainer nothing
shuts them down: they are reparented to init and live on (and keep multiprocessing's resource
tracker alive with them).

``install`` makes every child the kernel's problem: each one gets PR_SET_PDEATHSIG=SIGKILL, so
it is killed as soon as its parent dies, however the parent dies. Forked children get it from
an at-fork hook; spawned ones (fork + exec, which runs no Python hook) from a guard prepended to
multiprocessing's spawn command line; a torchrun worker sets it on itself (its parent is the
torchrun agent). Every child installs the same, so grandchildren are covered too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
# loaded here, not in a child right after fork
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_installed = False
_pid = 0  # this process's pid, as its children's parent (read in the child after a fork)
_main_ident = 0  # this process's main thread, the one that lives as long as the process


def install() -> None:
    """Tie this process's future children (and a torchrun worker itself) to their parent.

    Idempotent; called from init_runtime, before megatron can start any helper.
    """
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # set by torchrun for its workers
        # the agent (which starts workers from its main thread) forked us before this ran
        # (an agent that died in the microseconds before this line is not caught: a check on
        # getppid() == 1 would also kill workers whose agent IS pid 1 in a container)
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    _install_hooks()


def _install_hooks() -> None:
    global _installed, _pid, _main_ident
    if _installed:
        return
    _installed = True
    _pid, _main_ident = os.getpid(), threading.main_thread().ident
    os.register_at_fork(after_in_child=_after_fork_in_child)
    _patch_spawn()


def _tie_to_parent(parent: int, forked_from_main: bool) -> None:
    """Die with ``parent``, the process that forked (or spawned) this one."""
    if forked_from_main:
        _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    else:
        # PDEATHSIG fires when the forking *thread* exits, which may be long before its process
        # does: watch the parent process instead.
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                         name="remax-parent-watch").start()
    if os.getppid() != parent:  # it died between fork and prctl, too early for the signal
        os.kill(os.getpid(), signal.SIGKILL)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def _after_fork_in_child() -> None:
    global _pid, _main_ident
    parent, forked_from_main = _pid, threading.get_ident() == _main_ident
    _pid, _main_ident = os.getpid(), threading.get_ident()  # for our own children
    _tie_to_parent(parent, forked_from_main)


def _adopt(parent: int, forked_from_main: bool) -> None:
    """First thing a spawned child runs (see _patch_spawn)."""
    _tie_to_parent(parent, forked_from_main)
    _install_hooks()  # not install(): we inherited torchrun's environment but not its agent


def _patch_spawn() -> None:
    """Prepend ``_adopt`` to the ``python -c`` program multiprocessing's spawn runs."""
    from multiprocessing import spawn

    original = spawn.get_command_line

    def get_command_line(**kwds):
        cmd = original(**kwds)
        if len(cmd) >= 3 and cmd[-3] == "-c":  # [exe, *flags, "-c", prog, "--multiprocessing-fork"]
            from_main = threading.get_ident() == threading.main_thread().ident
            # sys.path is the parent's again once spawn_main runs (prepare() replaces it)
            # (a child that cannot import us runs unguarded rather than not at all)
            guard = (f"import sys; sys.path.insert(0, {_ROOT!r})\n"
                     "try: from remax_megatron.runtime.lifetime import _adopt\n"
                     "except ImportError: _adopt = lambda *args: None\n"
                     f"_adopt({os.getpid()}, {from_main})\n")
            cmd = [*cmd[:-2], guard + cmd[-2], cmd[-1]]
        return cmd

    spawn.get_command_line = get_command_line


PARENT_VARIABLE = "REMAX_DIE_WITH_PARENT"  # a pid: set by a process of ours for its child


def adopt_from_environment() -> None:
    """A command started by one of our processes (e.g. the end-of-training export) dies with it:
    the parent names itself in $REMAX_DIE_WITH_PARENT rather than forking itself for a
    preexec_fn. Called first thing by the command line."""
    parent = os.environ.pop(PARENT_VARIABLE, None)
    if parent is None or _LIBC is None:
        return
    _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != int(parent):  # it died before the prctl: too early for the signal
        os.kill(os.getpid(), signal.SIGKILL)
