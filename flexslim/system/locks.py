"""Run-folder locks: one job at a time in a run folder (flock on `<run>/.lock`, held for the process's life); and
`exclusive`, a short flock around a read-modify-write of a shared file (the latency cache's writers)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.system.distributed import is_main

# -- one process per run: an flock on run_dir/.lock, held until the job ends (or the process does) ------------
LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}  # resolved run dir -> the fd whose flock this process holds


def lock_run(run_dir: str | Path) -> Path:
    """Take the run's lock (`run_dir/.lock`, fcntl.flock) for this process; BadInput naming the pid that holds it.

    Re-entrant within one process (a job that opens its run twice keeps one lock). The lock lives until
    `release_run(run_dir)` / `release_runs()` or the end of the process (the kernel drops it, even on kill -9).
    """
    key = str(Path(run_dir).resolve())
    if key in _HELD or not is_main():  # under torchrun rank 0 holds the run's lock for the whole job
        return Path(run_dir)
    path = Path(run_dir) / LOCK_FILE
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise BadInput(
            f"run {run_dir} is in use by pid {pid}; wait for that job to end (or stop it), or pick another --run-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    return Path(run_dir)


def _open_lock(path: Path) -> int:
    """The lock file opened for writing, never through a symbolic link (a crafted run folder's `.lock -> ~/.bashrc`
    would be truncated) and only when it is a regular file; BadInput otherwise."""
    refuse = BadInput(f"{path} is not a plain file (a symbolic link or special file); delete it and rerun")
    if path.is_symlink():
        raise refuse
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise refuse from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refuse
    return fd


def release_run(run_dir: str | Path) -> None:
    """Drop this process's lock on `run_dir` (no-op when it holds none)."""
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def release_runs() -> None:
    """Drop every run lock this process holds (the CLI calls it when a command ends)."""
    for key in list(_HELD):
        os.close(_HELD.pop(key))


@contextlib.contextmanager
def exclusive(path: str | Path, wait_s: float = 10.0):
    """Hold an exclusive flock on `path` (created if missing; a plain file, never through a link) for the block,
    waiting up to `wait_s` seconds for another holder; TimeoutError past that, BadInput for a link or special file.
    For short critical sections shared by processes (the kernel drops the lock when its holder dies, even on kill -9).
    """
    fd = _open_lock(Path(path))
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} stayed locked by another process for {wait_s:g} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the flock
