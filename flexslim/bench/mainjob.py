"""The README main job as a benchmark: cold (an empty latency cache) and warm (the same commands again, the cache
kept), each `flexslim search` + `flexslim export` in fresh processes, as a user runs them.

    python -m flexslim.bench.mainjob [--recipe quickstart] [--latency-ms 0.06] [--validates 3] [--out DIR]

Prints, for each run, the wall time split into latency model / bake / search / retrain / the rest of the search
command (start-up, data, plots, writes) / export (conversion + gate), the networks the latency cache served, the
latency model's hold-out error (near the budget and over the box), and the landing: the bake's figure and the
median of `--validates` fresh `flexslim validate` runs of the cold run's model.onnx, each / budget. Time it alone on
the machine: anything else running is in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_GATE = re.compile(r"(PASS|FAIL) latency: p\d+(?:\.\d+)? ([0-9.]+) ms")


def _flexslim(args: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, int, str]:
    """(wall seconds, exit code, output) of `python -m flexslim ARGS` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flexslim", *args], cwd=cwd, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    return time.perf_counter() - t0, proc.returncode, proc.stdout + proc.stderr


def one_job(folder: Path, recipe: str, budget_ms: float, env: dict) -> dict:
    """Run the main job once in `folder`; its figures (see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    search_s, rc, _ = _flexslim(
        ["search", "--recipe", recipe, "--latency-ms", str(budget_ms)], folder, env, folder / "search.log"
    )
    if rc != 0:
        raise SystemExit(f"search exit {rc}: see {folder / 'search.log'}")
    export_s, rc, out = _flexslim(["export", "model.onnx"], folder, env, folder / "export.log")
    run = folder / "runs" / "latest"
    record = json.loads((run / "run.json").read_text())
    error = json.loads((run / "latency.json").read_text()).get("error", {})
    gate = _GATE.search(out)
    latency_all = float(record.get("latency_seconds", 0.0))  # the latency stage and the bake
    bake = float(record.get("bake_seconds", 0.0))
    search = float(record.get("search_seconds", 0.0))
    train = float(record.get("train_seconds", 0.0))
    return {
        "wall_s": search_s + export_s,
        "latency_model_s": latency_all - bake,
        "bake_s": bake,
        "search_s": search,
        "retrain_s": train,
        "other_s": search_s - latency_all - search - train,
        "export_s": export_s,
        "export_exit": rc,
        "cache": _served(record, "latency") + " + bake " + _served(record, "bake"),
        "holdout_near_median_pct": error.get("near_median_pct"),
        "holdout_near_max_pct": error.get("near_max_pct"),
        "holdout_median_pct": error.get("median_pct"),
        "holdout_max_pct": error.get("max_pct"),
        "widths": record.get("widths"),
        "bake_ratio": float(record["measured_ms"]) / budget_ms,
        "export_gate_ratio": float(gate.group(2)) / budget_ms if gate else None,
    }


def _served(record: dict, stage: str) -> str:
    hits, misses = record.get(f"{stage}_cache_hits", 0), record.get(f"{stage}_cache_misses", 0)
    return f"{hits}/{hits + misses}"


def validated(model: Path, budget_ms: float, n: int, env: dict) -> list[float]:
    """The gate's figure / budget of `n` fresh `flexslim validate` runs of `model`."""
    ratios = []
    for i in range(n):
        report = model.parent / f"validate-{i}.json"
        _flexslim(
            ["validate", str(model), "--latency-ms", str(budget_ms), "--report", str(report)],
            model.parent,
            env,
            model.parent / f"validate-{i}.log",
        )
        ratios.append(float(json.loads(report.read_text())["latency_ms"]) / budget_ms)
    return ratios


def _show(name: str, r: dict) -> str:
    f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
    return (
        f"{name}: {r['wall_s']:.1f} s = latency model {r['latency_model_s']:.1f} + bake {r['bake_s']:.1f} + search "
        f"{r['search_s']:.1f} + retrain {r['retrain_s']:.1f} + rest of search {r['other_s']:.1f} + export "
        f"{r['export_s']:.1f} (exit {r['export_exit']}); cache {r['cache']}; hold-out near the budget median "
        f"{f(r['holdout_near_median_pct'])}% max {f(r['holdout_near_max_pct'])}%, over the box median "
        f"{f(r['holdout_median_pct'])}% max {f(r['holdout_max_pct'])}%; {r['widths']} bake {r['bake_ratio']:.3f} x, "
        f"export gate {f(r['export_gate_ratio'], '{:.3f}')} x budget"
    )


def main(argv: list[str] | None = None) -> int:
    """Cold, then warm, then the validates; prints one line each and writes mainjob.json in the folder."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="quickstart")
    p.add_argument("--latency-ms", type=float, default=0.06)
    p.add_argument("--validates", type=int, default=3)
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True, help="run the job a second time")
    p.add_argument("--cache", type=Path, default=None, help="the latency cache folder (default: a new one: cold)")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a new temporary one)")
    a = p.parse_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="flexslim-mainjob-"))
    env = {**os.environ, "FLEXSLIM_CACHE": str(a.cache or out / "cache")}  # a new one is empty: cold
    env.pop("FLEXSLIM_NO_CACHE", None)
    cold = one_job(out / "cold", a.recipe, a.latency_ms, env)
    print(_show("cold", cold), flush=True)
    warm = one_job(out / "warm", a.recipe, a.latency_ms, env) if a.warm else None
    if warm is not None:
        print(_show("warm", warm), flush=True)
    ratios = validated(out / "cold" / "model.onnx", a.latency_ms, a.validates, env) if a.validates else []
    if ratios:
        print(f"cold model.onnx, {len(ratios)} fresh validates: " + ", ".join(f"{r:.3f}" for r in ratios)
              + f" x budget (median {statistics.median(ratios):.3f})")  # fmt: skip
    (out / "mainjob.json").write_text(json.dumps({"cold": cold, "warm": warm, "validates": ratios}, indent=2))
    print(f"runs and mainjob.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
