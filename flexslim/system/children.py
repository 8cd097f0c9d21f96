"""Child processes that die with their parent: every process flexslim starts ends within a second of its parent.

A `kill -9` of a job used to leave its isolated timing helper running (parent 1, half a GB resident, and still
timing on the CPU the next job measures on). Every child flexslim starts calls `die_with_parent` first:

- on Linux, the parent-death signal: prctl(PR_SET_PDEATHSIG, SIGKILL), then a re-check of os.getppid() against
  the parent's pid (the parent may have died before the prctl). The kernel sends the signal when the parent
  *thread* that started the child exits, not the process, so it is only asked for when the child was started
  from the parent's main thread (which lives as long as the process); otherwise the watchdog alone serves;
- everywhere, a watchdog thread that calls os._exit as soon as the parent is gone: it waits on the
  multiprocessing parent sentinel (the pipe to the parent: EOF when the parent is gone) where there is one, and
  else polls the parent's pid every `POLL_SECONDS`.

The parent side: `pool_initializer` / `pool_initargs` for multiprocessing (ProcessPoolExecutor's `initializer`),
`child_env` for a subprocess whose entry point calls `adopt_from_env` first (`python -m flexslim`,
`python -m flexslim.bench`). No preexec_fn: it is not safe in a process with threads. DataLoader workers
(flexslim.data may not import this package) use the same prctl through `flexslim.data.tensors.die_with_owner`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PARENT_ENV = "FLEXSLIM_PARENT"  # "<pid>" or "<pid>:pdeathsig", set by `child_env`, read by `adopt_from_env`
POLL_SECONDS = 0.2
ORPHANED_EXIT = 128 + 9  # the exit status of a child whose parent is gone (as if SIGKILLed with it)
_PR_SET_PDEATHSIG = 1


def set_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent thread exits (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_alive(parent_pid: int) -> bool:
    """Whether the process that started this one is still running."""
    if os.name == "posix":
        return os.getppid() == parent_pid  # an orphan is re-parented (to init or a subreaper)
    import ctypes  # Windows: the pid is not re-parented, ask whether the process still runs

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x00100000, False, parent_pid)  # SYNCHRONIZE
    if not handle:
        return False
    try:
        return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
    finally:
        kernel32.CloseHandle(handle)


def die_with_parent(parent_pid: int, death_signal: bool = True, sentinel=None) -> None:
    """Make this process end as soon as `parent_pid` is gone; call it first thing in a child.

    Args:
        parent_pid: the pid of the process that started this one.
        death_signal: also ask for the Linux parent-death signal (only when the parent started this process from
            its main thread: the signal follows the starting thread, see the module notes).
        sentinel: a multiprocessing parent sentinel (`multiprocessing.parent_process().sentinel`): the watchdog
            then waits on it instead of polling.
    """
    if death_signal:
        set_death_signal()
    if not parent_alive(parent_pid):  # died before the prctl (or before this process got this far)
        os._exit(ORPHANED_EXIT)
    threading.Thread(target=_watch, args=(parent_pid, sentinel), name="flexslim-parent-watchdog", daemon=True).start()


def _watch(parent_pid: int, sentinel) -> None:
    """The watchdog thread: os._exit (no cleanup, no waiting for a measurement to finish) once the parent is gone."""
    if sentinel is not None:
        from multiprocessing.connection import wait

        wait([sentinel])  # ready (EOF) when the parent is gone
    else:
        stop = threading.Event()
        while parent_alive(parent_pid):
            stop.wait(POLL_SECONDS)
    os._exit(ORPHANED_EXIT)


def _started_from_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def pool_initargs() -> tuple[int, bool]:
    """`initargs` for `pool_initializer`, computed in the parent in the thread that will start the workers."""
    return os.getpid(), _started_from_main_thread()


def pool_initializer(parent_pid: int, death_signal: bool) -> None:
    """A multiprocessing worker's initializer: `die_with_parent`, watching the pipe to the parent."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    die_with_parent(parent_pid, death_signal, parent.sentinel if parent is not None else None)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment (default: this process's) for a subprocess whose entry point calls `adopt_from_env`.
    Call it in the thread that starts the subprocess."""
    mark = f"{os.getpid()}:pdeathsig" if _started_from_main_thread() else str(os.getpid())
    return {**(os.environ if env is None else env), PARENT_ENV: mark}


def adopt_from_env() -> None:
    """In a subprocess's entry point, first: `die_with_parent` when the parent set `PARENT_ENV` (`child_env`).
    The variable is removed, so this process's own children do not inherit the wrong parent."""
    mark = os.environ.pop(PARENT_ENV, "")
    if not mark:
        return
    pid, _, how = mark.partition(":")
    try:
        parent_pid = int(pid)
    except ValueError:
        return
    die_with_parent(parent_pid, death_signal=how == "pdeathsig")
