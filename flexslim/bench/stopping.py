"""What a timing that stops once it knows saves, and how far it reads from one timed in full, on one ONNX file:

    python -m flexslim.bench.stopping MODEL.onnx [--rounds 4] [--tolerance 0.01] [--seconds 2] [--repeats 3]

Each round times the file as the bake does in full (`--repeats` sessions of `--seconds`, the median session's p90)
and with its sessions stopping once their p90 is known within +-`--tolerance` (`latency.bake_tolerance`), one after
the other in the isolated timing helper; prints each round's figures and seconds, the means and their ratio. Measured
on a 2-core AMD EPYC VM (2026-12-08): 6.1 s -> 1.6 s a network, reading 0.6-2.2% lower. Time it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def timed(model: bytes, tolerance: float, seconds: float, repeats: int, batch: int, threads: int):
    """(the median session's p90 in ms/sample, wall seconds) of `repeats` fresh sessions of `model`, timed as the
    bake times (`profiling._timed_sessions`: in the isolated helper, or on the job's remote timer)."""
    from flexslim.latency.profiling import _timed_sessions
    from flexslim.recipe.schema import LatencyConfig

    per = {"min_seconds": seconds * repeats, "repeats": repeats, "tolerance": tolerance}
    settings = LatencyConfig(provider="cpu", batch=batch, threads=threads, **per)
    t0 = time.perf_counter()
    t = _timed_sessions(model, settings, 0)
    return t.at_percentile_ms, time.perf_counter() - t0


def compare(path: Path, rounds: int, tolerance: float, seconds: float, repeats: int, batch: int, threads: int) -> dict:
    """{"full": [(ms, s), ...], "stopping": [(ms, s), ...]} over `rounds` interleaved rounds."""
    model = path.read_bytes()
    out: dict[str, list[tuple[float, float]]] = {"full": [], "stopping": []}
    for _ in range(rounds):
        out["full"].append(timed(model, 0.0, seconds, repeats, batch, threads))
        out["stopping"].append(timed(model, tolerance, seconds, repeats, batch, threads))
    return out


def main(argv: list[str] | None = None) -> int:
    """Print each way's figures, seconds and the ratio of the means (stopping / full)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per session at most")
    p.add_argument("--repeats", type=int, default=3, help="sessions per timing")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    res = compare(a.model, a.rounds, a.tolerance, a.seconds, a.repeats, a.batch, a.threads)
    means = {}
    for way, rows in res.items():
        means[way] = statistics.mean(ms for ms, _ in rows)
        figures = " ".join(f"{ms:.4f}" for ms, _ in rows)
        print(f"{way:8s} p90 {figures} ms (mean {means[way]:.5f}), {statistics.mean(s for _, s in rows):.2f} s each")
    print(f"stopping / full: {means['stopping'] / means['full']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
