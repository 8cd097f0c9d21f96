"""The isolated timing helper: one long-lived spawned process that runs measurements away from torch.

`run_isolated(fn, ...)` runs fn in it and `start_isolated(fn, ...)` queues fn without waiting (fn is pickled by
module path, so it must be a module-level function, e.g. `flexslim.latency.runtime.time_model_bytes`); a call
that outlives `limit_s` is TimedOut and the helper is killed, a helper that dies is TimingFailed. `HELPER_GRACE` is
the slack given beyond a timing's own limit. Re-exported by `flexslim.latency.runtime`; imports nothing from it.
"""

from __future__ import annotations

from flexslim.errors import TimedOut, TimingFailed

HELPER_GRACE = 60.0  # seconds the isolated helper gets beyond a timing's own limit (spawn, imports, session)

_POOL = None


def isolated_pool():
    """One long-lived helper process (spawned, so it holds no torch state) that does the timing.

    Timing inside a process that has just trained or exported with torch measured up to 40% slower on a
    2-core machine (torch's worker threads and heap churn compete with onnxruntime); the helper process
    only runs onnxruntime, as the deployment will.
    """
    global _POOL
    if _POOL is None:
        import atexit
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from flexslim.system.children import pool_initargs, pool_initializer

        # the helper dies with this process, however it ends (a kill -9 left it timing, orphaned: issue #22)
        _POOL = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=pool_initializer,
            initargs=pool_initargs(),
        )
        atexit.register(_POOL.shutdown)
    return _POOL


def start_isolated(fn, *args) -> None:
    """Start the helper (when it is not running) and queue fn(*args) in it without waiting: a job that will need
    the helper soon starts it before its own work, so the helper's start-up and imports overlap that work instead
    of coming after it. fn's result and errors are dropped (a helper that dies is reported by the next
    `run_isolated`); calls run one at a time, in order, so a measurement queued later never overlaps fn."""
    isolated_pool().submit(fn, *args)


def run_isolated(fn, *args, limit_s: float | None = None, **kwargs):
    """fn(*args, **kwargs) in the isolated helper process; its errors (BadInput included) are raised here.

    If the helper process dies (killed, out of memory, cannot be spawned), that is `TimingFailed` (exit 3):
    timing is never re-run in this process, which measures up to 40% slow. The next call starts a new helper.
    With `limit_s`, a call still running after that many seconds is `TimedOut` (exit 1) and the helper is killed
    (not left timing on the CPU the next measurement uses); the next call starts a new one.
    """
    global _POOL
    from concurrent.futures import TimeoutError as FutureTimeout
    from concurrent.futures.process import BrokenProcessPool

    name = getattr(fn, "__name__", "a measurement")
    try:
        return isolated_pool().submit(fn, *args, **kwargs).result(timeout=limit_s)
    except FutureTimeout:
        _kill_pool()
        raise TimedOut(
            f"gate failed: timed out after {limit_s:g} s: {name} in the isolated timing process did not finish, "
            "and the process was stopped; give the measurement more time (--timeout, latency.timeout)"
        ) from None
    except BrokenProcessPool as err:
        pool, _POOL = _POOL, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise TimingFailed(
            f"the isolated timing process died while running {name} "
            f"({str(err).strip() or 'no reason given'}); flexslim does not time in the main process (it measures up "
            "to 40% slow). Check memory and rerun; a script run from stdin cannot spawn it, save it to a file"
        ) from None


def _kill_pool() -> None:
    """Terminate the helper process (SIGTERM, then SIGKILL after 2 s) and forget the pool."""
    global _POOL
    pool, _POOL = _POOL, None
    if pool is None:
        return
    workers = list((getattr(pool, "_processes", None) or {}).values())  # ProcessPoolExecutor's own workers
    for proc in workers:
        proc.terminate()
    for proc in workers:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()  # SIGKILL cannot be caught: wait until it is reaped (a loaded machine may take seconds)
    # wait for the pool's manager thread to see the dead worker and end: left running (wait=False), it raced the
    # interpreter's exit and printed "Bad file descriptor" tracebacks (CPython gh-132969; seen in the timer's test)
    pool.shutdown(wait=True, cancel_futures=True)
