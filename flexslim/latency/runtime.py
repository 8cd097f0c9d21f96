"""onnxruntime sessions and timing, shared by the latency model and the validate gate.

Budget semantics (the same everywhere): per-sample latency = time of one forward pass at batch N / N,
read at a percentile of the timed passes after `warmup` untimed ones, on the named execution provider
with a set intra-op thread count. onnxruntime falls back to CPU silently, so every timing records the
provider that actually ran.

Undisturbed passes: the timed passes are cut into consecutive windows (up to 20, at least 10 passes each); a
window whose median pass is more than 3% slower than the quietest window's was disturbed by something else on
the machine (the quietest quarter of the windows is kept whatever their spread). Measured on a shared 2-core
VM: 6-34% of 1 s stretches run 5-60% slow for seconds at a time, the network unchanged. The percentile is read
over the passes of the undisturbed windows, so the same network gives the same number from run to run; the
percentile over every pass is kept next to it (`all_passes_ms`), with the count of windows kept. Nothing is
dropped when the machine is quiet.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flexslim.errors import BadInput, TimingFailed
from flexslim.recipe import checks
from flexslim.recipe.choices import PROVIDERS

_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@functools.cache
def cuda_usable() -> bool:
    """True when onnxruntime's CUDA provider can actually run here (a GPU and its libraries are present)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        import torch

        if not torch.cuda.is_available():
            return False
    except ImportError:
        pass
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # finds the CUDA/cuDNN libraries that torch's wheels installed
        except Exception:  # noqa: BLE001 - a failed preload just means no CUDA provider
            return False
    return True


def provider_list(provider: str) -> list[str]:
    """The explicit provider list for a choice of auto | cpu | cuda (CUDA only when it can load)."""
    if provider not in PROVIDERS:
        raise BadInput(f"unknown provider '{provider}'; valid: {', '.join(PROVIDERS)}")
    if provider == "cuda":
        if not cuda_usable():
            raise BadInput(
                "--provider cuda: onnxruntime's CUDA provider cannot run here (no GPU or no CUDA libraries); "
                "use --provider cpu or auto"
            )
        return [_NAMES["cuda"], _NAMES["cpu"]]
    if provider == "auto" and cuda_usable():
        return [_NAMES["cuda"], _NAMES["cpu"]]
    return [_NAMES["cpu"]]


def make_session(model: str | Path | bytes, provider: str = "auto", threads: int = 0):
    """An InferenceSession on the chosen provider; `threads` > 0 fixes the intra-op thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no warnings about unused providers on a CPU machine
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=provider_list(provider))


def ran_provider(session) -> str:
    """The provider that actually runs the graph ('cpu' or 'cuda')."""
    first = session.get_providers()[0]
    return "cuda" if first == _NAMES["cuda"] else "cpu"


@dataclass(frozen=True)
class Timing:
    """Per-sample latency statistics of one session at one batch size, in milliseconds."""

    provider: str
    batch: int
    input_shape: tuple[int, ...]  # the full timed input, batch first
    threads: int
    warmup: int
    runs: int
    percentile: float
    p50_ms: float
    p90_ms: float
    at_percentile_ms: float  # the gate's statistic (p90 by default)
    mean_ms: float
    runtime: str
    windows: int = 1  # timed passes cut into this many consecutive windows ...
    quiet_windows: int = 1  # ... of which these were undisturbed (their passes give the figures above)
    all_passes_ms: float | None = None  # the percentile over every timed pass, disturbed windows included
    sessions: tuple[float, ...] = ()  # when this is the median of several sessions: each session's percentile

    def spread(self) -> float | None:
        """Largest relative deviation of one session from this (median) one; None for a single session."""
        return relative_spread(self.at_percentile_ms, self.sessions)

    def to_dict(self) -> dict:
        """The timing as JSON-ready values (what reports and latency.json keep)."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["sessions"] = list(self.sessions)
        return d


def time_session(
    session,
    batch: int,
    warmup: int = 10,
    runs: int = 50,
    percentile: float = 90.0,
    threads: int = 0,
    seed: int = 0,
    min_seconds: float = 0.0,
) -> Timing:
    """Time at least `runs` forward passes, and keep going until `min_seconds` of timed passes have been
    collected; per-sample = pass time / batch; the figures are read over the undisturbed windows' passes
    (`undisturbed`). The time floor matters for small models: 50 passes of a 2 ms graph span 0.1 s, too
    short to tell a disturbed stretch from the network's own time."""
    import numpy as np
    import onnxruntime as ort

    runs = checks.runs(runs, "timing runs")
    warmup = checks.warmup(warmup, "timing warm-up")
    min_seconds = checks.min_seconds(min_seconds, "timing min_seconds")
    percentile = checks.percentile(percentile, "timing percentile")
    threads = checks.threads(threads, "timing threads")
    inp = session.get_inputs()[0]
    sample = [_static_dim(d, inp.name) for d in inp.shape[1:]]
    batch = checks.batch(batch, "timing batch", tuple(sample))  # caps the input allocation too
    shape = [batch] + sample
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    feeds = {inp.name: x}
    provider = ran_provider(session)
    run = _runner(session, feeds, provider)
    for _ in range(warmup):
        run()
    samples = []
    start = time.perf_counter()
    while len(samples) < runs or (time.perf_counter() - start < min_seconds and len(samples) < checks.MAX_RUNS):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3 / batch)
    arr, windows, quiet = undisturbed(samples)
    return Timing(
        provider=provider,
        batch=batch,
        input_shape=tuple(shape),
        threads=threads,
        warmup=warmup,
        runs=len(samples),
        percentile=percentile,
        p50_ms=float(np.percentile(arr, 50)),
        p90_ms=float(np.percentile(arr, 90)),
        at_percentile_ms=float(np.percentile(arr, percentile)),
        mean_ms=float(statistics.fmean(arr)),
        runtime=f"onnxruntime {ort.__version__}",
        windows=windows,
        quiet_windows=quiet,
        all_passes_ms=float(np.percentile(samples, percentile)),
    )


GATE_SECONDS = 2.0  # seconds of timed passes in one gate measurement (validate's default --min-seconds)
QUIET = 1.03  # a window whose median pass is within 3% of the quietest window's median is undisturbed
WINDOW_PASSES = 10  # at least this many passes per window ...
MAX_WINDOWS = 20  # ... and at most this many windows
MIN_KEPT = 0.25  # whatever the jitter, the figures come from at least the quietest quarter of the windows


def relative_spread(median: float, sessions) -> float | None:
    """Largest relative deviation of one session's figure from their median (None with fewer than two)."""
    if len(sessions) < 2:
        return None
    return max(abs(v - median) for v in sessions) / median


def undisturbed(samples) -> tuple:
    """(the passes of the undisturbed windows, number of windows, number kept): see the module docstring.
    At least the quietest quarter of the windows is kept (a tiny graph's window medians jitter by more than
    3% on a quiet machine: the figures never rest on one lucky window). Fewer than 2 x WINDOW_PASSES passes
    make one window, kept whole."""
    import numpy as np

    arr = np.asarray(samples, dtype=float)
    k = max(1, min(MAX_WINDOWS, len(arr) // WINDOW_PASSES))
    chunks = np.array_split(arr, k)
    medians = [float(np.median(c)) for c in chunks]
    calm = min(medians)
    floor = sorted(medians)[math.ceil(MIN_KEPT * k) - 1]  # the quietest quarter is always kept
    kept = [c for c, m in zip(chunks, medians) if m <= max(QUIET * calm, floor)]
    return np.concatenate(kept), k, len(kept)


def _static_dim(d, name: str) -> int:
    if isinstance(d, int) and d > 0:
        return d
    raise BadInput(f"input '{name}' has a dynamic non-batch dimension ({d!r}); only the batch axis may be dynamic")


def _runner(session, feeds: dict, provider: str):
    """A zero-argument callable doing one synchronous forward pass.

    On CUDA the input is bound once on the device (IO binding), so the timing covers the graph, not the
    host-to-device copy of the random input; outputs stay on the device.
    """
    if provider != "cuda":
        return lambda: session.run(None, feeds)
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def time_model_bytes(
    model: bytes,
    provider: str,
    threads: int,
    batch: int,
    warmup: int,
    runs: int,
    percentile: float,
    seed: int = 0,
    min_seconds: float = 0.0,
) -> Timing:
    """Session + timing of a serialised model: the unit of work of the isolated timing process."""
    session = make_session(model, provider, threads)
    return time_session(session, batch, warmup, runs, percentile, threads, seed, min_seconds)


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


def run_isolated(fn, *args, **kwargs):
    """fn(*args, **kwargs) in the isolated helper process; its errors (BadInput included) are raised here.

    If the helper process dies (killed, out of memory, cannot be spawned), that is `TimingFailed` (exit 3):
    timing is never re-run in this process, which measures up to 40% slow. The next call starts a new helper.
    """
    global _POOL
    from concurrent.futures.process import BrokenProcessPool

    try:
        return isolated_pool().submit(fn, *args, **kwargs).result()
    except BrokenProcessPool as err:
        pool, _POOL = _POOL, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        raise TimingFailed(
            f"the isolated timing process died while running {getattr(fn, '__name__', 'a measurement')} "
            f"({str(err).strip() or 'no reason given'}); flexslim does not time in the main process (it measures up "
            "to 40% slow). Check memory and rerun; a script run from stdin cannot spawn it, save it to a file"
        ) from None


def time_isolated(*args, **kwargs) -> Timing:
    """`time_model_bytes` in the isolated helper process."""
    return run_isolated(time_model_bytes, *args, **kwargs)
