"""Memory readings for the search: resident set on the CPU, peak allocated on CUDA, and the peak bytes of live
tensors over a window of search steps (`tensor_peak`, the figure the paper's GPU memory means).

On the CPU, ru_maxrss is the process's lifetime peak, so the search's own memory is read as the rise of
that peak over the resident set just before the search loop (a fresh process per method in the bench).
The resident set also holds allocator caches, oneDNN and onnxruntime buffers; `tensor_peak` counts only
tensors: the state that lives across steps (parameters, buffers, optimizer state) plus the peak of what the
steps allocate (activations, gradients, temporaries), read from torch.profiler's memory events on the CPU
and from torch.cuda.max_memory_allocated on CUDA. The dataset held in memory is not counted.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterable
from pathlib import Path


def rss_mb() -> float:
    """Current resident set of this process (Linux /proc; NaN elsewhere)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class SearchMemory:
    """Brackets the search loop: `start()` before, `stop()` after -> a dict for run.json."""

    def __init__(self, device):
        self.device = device
        self.before = 0.0

    def start(self) -> None:
        """Start the reading (resets CUDA's peak; notes the CPU's resident set)."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self.before = rss_mb()

    def stop(self) -> dict:
        """End the reading -> {kind, peak_mb, ...} for run.json."""
        if self.device.type == "cuda":
            import torch

            return {
                "kind": "cuda max allocated",
                "peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "search_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
            }
        peak = peak_rss_mb()
        return {
            "kind": "peak RSS",
            "peak_mb": peak,
            "rss_before_search_mb": self.before,
            "search_mb": peak - self.before,
        }


def state_bytes(*holders) -> int:
    """Bytes of the tensors that live across steps: parameters and buffers of modules, state of optimizers."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for h in holders:
        if isinstance(h, torch.nn.Module):
            for t in (*h.parameters(), *h.buffers()):
                add(t)
        elif isinstance(h, torch.optim.Optimizer):
            for state in h.state.values():
                for t in state.values():
                    add(t)
    return total


MARK = "flexslim.tensor_peak.window"  # the profiler annotation around the measured steps


def tensor_peak(step: Callable[[], None], device, *, steps: int = 3, warmup: int = 1, holders: Iterable = ()) -> dict:
    """Peak bytes of live tensors while `step()` runs `steps` times (after `warmup` unmeasured calls).

    Args:
        step: one search step (weights step + architecture step); it must not keep tensors across calls
            other than the state of `holders`.
        device: the training device. CUDA: max_memory_allocated over the window; CPU: the running sum of
            torch.profiler's allocation events (profile_memory=True) over the window.
        holders: modules and optimizers whose tensors live across steps; counted whole (they were allocated
            before the window, so the allocator's window does not see them).

    Returns:
        {"tensor_peak_mb": state + peak of the steps' own tensors, "tensor_state_mb", "tensor_steps_mb",
        "tensor_window_steps", "tensor_source"} and, on CUDA, "cuda_max_allocated_mb" (everything allocated,
        the dataset on the device included: the paper's figure).
    """
    import torch

    for _ in range(warmup):  # optimizer state (momentum, Adam moments) is created by the first step
        step()
    state = state_bytes(*holders)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        rise, source, extra = peak - before, "torch.cuda.max_memory_allocated", {"cuda_max_allocated_mb": peak / 2**20}
    else:
        rise, source, extra = _profiled_rise(step, steps), "torch.profiler memory events (cpu)", {}
    return {
        "tensor_peak_mb": (state + rise) / 2**20,
        "tensor_state_mb": state / 2**20,
        "tensor_steps_mb": rise / 2**20,
        "tensor_window_steps": steps,
        "tensor_source": source,
        **extra,
    }


def _profiled_rise(step: Callable[[], None], steps: int) -> int:
    """Peak bytes allocated and still live during `steps` calls of `step`, from the profiler's allocation events.

    One unmeasured call runs inside the profiler first, so every transient tensor the measured calls free was
    allocated (and seen) inside the profiler; the peak is read only between the MARK annotation's ends.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function(MARK):
            for _ in range(steps):
                step()
    return _peak_live_bytes(prof)


def _peak_live_bytes(prof) -> int:
    """max over the MARK window of the bytes allocated inside the profiler and not yet freed."""
    try:  # the allocation timeline (alloc and free per event, ns); torch's own memory profiler reads the same
        from torch._C._profiler import _EventType

        events = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
        window = [e for e in events if e.name == MARK]
        if not window:
            raise LookupError(MARK)
        t0, t1 = window[0].start_time_ns, window[0].end_time_ns
        allocs = sorted(
            (e.start_time_ns, e.extra_fields.alloc_size)
            for e in events
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"
        )
    except (ImportError, AttributeError, LookupError):  # fall back on the public events: per-op net allocations
        return _peak_from_function_events(prof)
    live, peak = 0, 0
    for t, size in allocs:
        live += size
        if t0 <= t <= t1:
            peak = max(peak, live)
    start = sum(size for t, size in allocs if t < t0)
    return max(0, peak) if peak else max(0, start)


def _walk(events):
    for e in events:
        yield e
        yield from _walk(e.children)


def _peak_from_function_events(prof) -> int:
    """Coarser: the running sum of each profiler event's self memory (allocations inside one op net out)."""
    live, peak = 0, 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
