"""`flexslim sweep`: N budgets from just above the family's floor to its widest sensible network, one shared
latency table, one search per budget, and what each delivered network really measures -> sweep.md, sweep.csv,
sweep.json and a Pareto plot (accuracy vs latency). How a user picks a budget, and the check that the delivered
networks land in [0.90, 1.00] x budget.

Delivered latency: the network's ONNX export (the same file `flexslim export` writes) timed by the gate itself,
`flexslim validate` in a fresh process, `repeats` times (as a CI job runs it); the median of those p90s.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.latency.budget import Budget
from flexslim.system.console import Reporter
from flexslim.system.files import atomic_write_json, atomic_write_text

LOWEST = 1.3  # the smallest budget, x the floor: room for the window and the headroom above the narrowest net


@dataclass(frozen=True)
class SweepPlan:
    """The budgets of a sweep and the latency table they share."""

    budgets: tuple[float, ...]
    table: Path
    floor_ms: float
    top_ms: float


def budgets_between(floor_ms: float, top_ms: float, n: int) -> list[float]:
    """`n` budgets spaced geometrically from LOWEST x floor to `top_ms` (4 significant digits)."""
    if n < 1:
        raise BadInput(f"--budgets must be >= 1, got {n}")
    lo = LOWEST * floor_ms
    if top_ms <= lo:
        raise BadInput(f"the family's widest network ({top_ms:.4f} ms) is not above {LOWEST} x its floor ({lo:.4f} ms)")
    ratio = (top_ms / lo) ** (1 / max(1, n - 1))
    return [float(f"{lo * ratio**i:.4g}") for i in range(n)] if n > 1 else [float(f"{math.sqrt(lo * top_ms):.4g}")]


def plan_sweep(recipe: str, overrides: list[str], n: int, out: Path, data_dir, reporter: Reporter) -> SweepPlan:
    """Profile the family once (box samples: floor .. top of the region), choose the budgets, then measure the
    table near every budget; saved as out/latency.json for every search of the sweep."""
    from flexslim.jobs.latency import profile_job
    from flexslim.latency.model import with_grid
    from flexslim.latency.profiling import refine

    table = out / "latency.json"
    model = profile_job(recipe, overrides, table, data_dir=data_dir, reporter=reporter)
    top = max(p.ms for p in model.fit_points)  # the top corner of the region: twice the recipe's widths
    budgets = budgets_between(model.floor_ms, top, n)
    reporter.log(f"sweep budgets (ms): {', '.join(f'{b:g}' for b in budgets)}; measuring the table near each")
    from flexslim.recipe.schema import load_recipe

    refine(model, budgets, grid=with_grid(load_recipe(recipe, overrides), model).model.round_to, reporter=reporter)
    model.save(table)
    return SweepPlan(tuple(budgets), table, model.floor_ms, top)


def delivered_latency(run_dir: Path, budget_ms: float, repeats: int) -> dict:
    """Export the run's network (model.pt, else the searched weights) with the run's metadata, as `flexslim export`
    does, and time it `repeats` times with `flexslim validate` in a fresh process each, as a CI job would (the gate
    reads the budget from the metadata; the run's batch, threads and percentile are passed as flags; the first one
    also reads the accuracy)
    -> {"delivered_ms": median p90, "delivered_runs", "accuracy"}."""
    from flexslim.deploy.export import provenance
    from flexslim.jobs.export import export_as_deployed, recorded_precision
    from flexslim.recipe.schema import load_recipe
    from flexslim.system.runs import RunRecord
    from flexslim.train.checkpoint import load_model

    weights = run_dir / "model.pt" if (run_dir / "model.pt").is_file() else run_dir / "supernet_baked.pt"
    arch, model, _ = load_model(weights)
    path = run_dir / "delivered.onnx"
    record = RunRecord.load(run_dir)  # the run's latency settings (provider, batch, threads, percentile) travel
    recorded_precision(record["latency"], record)
    # the run's recipe: where an int8 graph's calibration images come from (an fp32 export needs none)
    recipe = load_recipe(str(run_dir / "recipe.toml")) if (run_dir / "recipe.toml").is_file() else None
    meta = provenance(arch, record["recipe"], budget_ms, record["latency"])  # the run's settings, as metadata
    export_as_deployed(model, arch, path, meta, record["latency"], recipe, run_dir)  # int8: beside its fp32 twin
    # the first gate also reads the accuracy; the others only time (the same graph scores the same on the same
    # images: each repeat would re-read the test set and import torch for it, ~1.2 s on the 2-core CPU)
    flags = [_gate_flags(record["latency"], arch.dataset if i == 0 else None) for i in range(repeats)]
    reports = [gate_in_fresh_process(path, run_dir / f"delivered-{i + 1}.json", flags[i]) for i in range(repeats)]
    _record_rechecks(reports, record)
    p90s = [r["latency_ms"] for r in reports]
    return {
        "delivered_ms": statistics.median(p90s),
        "delivered_runs": p90s,
        "accuracy": reports[0]["accuracy"],
        "accuracy_of": "retrained" if weights.name == "model.pt" else "searched weights",
    }


def _record_rechecks(reports: list[dict], record) -> None:
    """Each fresh gate's reading against the run's baked figure, as one of the device's re-timings (the headroom's
    measured floor of later bakes: `latency.rechecks`), as `flexslim export` records its gate's: the sweep's later
    budgets then keep the headroom what the gate moved here."""
    from flexslim.latency import rechecks

    for r in reports:
        rechecks.record_gate(record, r.get("device_fingerprint"), r.get("latency_ms"), r.get("stopped"))


def _gate_flags(latency: dict | None, dataset: str | None) -> list[str]:
    """The run's own latency settings as explicit flags (metadata only describes), and its dataset so the report
    has an accuracy (a folder run's images are not known here: latency only)."""
    from flexslim.deploy.gate import Measurement

    return Measurement.of_run(latency).flags() + (["--dataset", dataset] if dataset and dataset != "folder" else [])


def gate_in_fresh_process(model: Path, report: Path, flags: list[str] | tuple[str, ...] = ()) -> dict:
    """`flexslim validate MODEL --report REPORT` in a new interpreter (exit 0 or 1: a report either way) -> the
    report. Anything else is an error naming the command's last line."""
    import subprocess
    import sys

    from flexslim.system.children import child_env

    cmd = [sys.executable, "-m", "flexslim", "validate", str(model), "--report", str(report), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())  # it dies with this process
    if proc.returncode not in (0, 1) or not report.is_file():
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BadInput(f"the gate could not time {model} (exit {proc.returncode}): {last[0]}")
    return json.loads(report.read_text())


@dataclass(frozen=True)
class SweepRequest:
    """What `flexslim sweep` is asked: the recipe, how many budgets, where the table and runs go.

    Attributes:
        recipe: shipped recipe name or .toml path; overrides: `section.key=value` strings.
        n_budgets: how many budgets between the floor and the widest network.
        out: the sweep's folder (latency.json, budget-N/ runs, sweep.md/.csv/.json/.png).
        retrain: retrain every delivered network; repeats: fresh `flexslim validate` runs per network.
        data_dir, device: as for `flexslim search`.
    """

    recipe: str
    n_budgets: int
    out: Path
    overrides: tuple[str, ...] = ()
    retrain: bool = False
    repeats: int = 3
    data_dir: Path | None = None
    device: str = "auto"


def sweep_job(request: SweepRequest, reporter: Reporter | None = None) -> list[dict]:
    """One search per budget on one shared latency table; every delivered network measured `repeats` times.

    Returns one row per budget (also in out/sweep.json, sweep.csv, sweep.md, sweep.png).
    """
    from flexslim.jobs.search import SearchRequest

    reporter, out, recipe = reporter or Reporter(), request.out, request.recipe
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = plan_sweep(recipe, list(request.overrides), request.n_budgets, out, request.data_dir, reporter)
    search = SearchRequest(
        0.0,  # each budget's own below
        recipe=recipe,
        overrides=tuple(request.overrides),
        data_dir=request.data_dir,
        device=request.device,
        latency_table=plan.table,
        retrain=request.retrain,
        mark=False,
    )
    rows = []
    for i, b in enumerate(plan.budgets):
        reporter.log(f"sweep {i + 1}/{len(plan.budgets)}: budget {b:g} ms")
        one = replace(search, budget_ms=b, run_dir=out / f"budget-{i + 1}")
        rows.append(_one_budget(one, request.repeats, reporter))
        write_outputs(rows, out, recipe, plan, time.perf_counter() - t0)
    return rows


def _one_budget(request, repeats: int, reporter: Reporter) -> dict:
    """Search, bake (and retrain) for `request.budget_ms`, then time the delivered network; a budget the bake cannot
    meet (BadInput, e.g. the narrowest network measured over it) is a row with its error, and the sweep goes on."""
    from flexslim.jobs.search import search_job

    b, run_dir = request.budget_ms, request.run_dir
    try:
        res = search_job(request, reporter=reporter)
    except BadInput as err:
        reporter.log(f"  -> budget {b:g} ms failed: {err}")
        return {"budget_ms": b, "error": str(err), "run_dir": str(run_dir)}
    row = _row(b, res) | delivered_latency(res.run_dir, b, repeats)
    row["ratio"] = row["delivered_ms"] / b
    row["in_window"] = Budget(b).in_window(row["delivered_ms"])
    reporter.log(f"  -> {row['widths']}: delivered p90 {row['delivered_ms']:.4f} ms = {row['ratio']:.3f} x budget")
    return row


def fastest_reaching(rows: list[dict], min_accuracy: float) -> tuple[dict | None, dict | None]:
    """The paper's high-resource scenario: (the fastest delivered network whose accuracy reaches `min_accuracy`,
    the most accurate one) over the rows that delivered a network; either is None when there is none."""
    done = [r for r in rows if not failed(r) and r.get("accuracy") is not None]
    reaching = [r for r in done if r["accuracy"] >= min_accuracy]
    fastest = min(reaching, key=lambda r: r["delivered_ms"]) if reaching else None
    best = max(done, key=lambda r: r["accuracy"]) if done else None
    return fastest, best


def failed(row: dict) -> bool:
    """A budget whose search failed or whose delivered network measured over it."""
    return "error" in row or row["delivered_ms"] > row["budget_ms"]


def _row(budget: float, res) -> dict:
    f = res.fitted
    return {
        "budget_ms": budget,
        "widths": res.arch.widths,
        "predicted_ms": float(res.latency.predict(res.arch.widths)),
        "bake_ms": f.measured_ms,
        "bake_measurements": f.measurements,
        "note": f.note,
        "search_seconds": res.search_seconds,
        "run_dir": str(res.run_dir),
    }


COLUMNS = ["budget_ms", "widths", "predicted_ms", "bake_ms", "delivered_ms", "ratio", "in_window", "accuracy"]


def write_outputs(rows: list[dict], out: Path, recipe: str, plan: SweepPlan, seconds: float) -> None:
    """sweep.json (everything), sweep.csv (one line per budget), sweep.md (table + verdict), sweep.png (Pareto)."""
    atomic_write_json(
        out / "sweep.json",
        {"recipe": recipe, "floor_ms": plan.floor_ms, "top_ms": plan.top_ms, "seconds": seconds, "rows": rows},
    )
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS + ["error"])
    for r in rows:
        w.writerow([json.dumps(r.get(k)) if isinstance(r.get(k), dict) else r.get(k) for k in COLUMNS + ["error"]])
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    done = [r for r in rows if "error" not in r]
    inside = sum(r["in_window"] for r in done)
    over = sum(r["delivered_ms"] > r["budget_ms"] for r in done)
    lines = [
        f"# flexslim sweep: {recipe} (floor {plan.floor_ms:.4f} ms, widest {plan.top_ms:.4f} ms, {seconds:.0f} s)",
        "",
        "| budget (ms) | widths | predicted (ms) | bake p90 (ms) | delivered p90 (ms) | / budget | in [0.90, 1.00] "
        "| accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in done:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f} ({r['accuracy_of']})"
        lines.append(
            f"| {r['budget_ms']:g} | {'/'.join(str(v) for v in r['widths'].values())} | {r['predicted_ms']:.4f} | "
            f"{r['bake_ms']:.4f} | {r['delivered_ms']:.4f} | {r['ratio']:.3f} | {'yes' if r['in_window'] else 'NO'} | "
            f"{acc} |"
        )
    lines += ["", f"{inside} of {len(rows)} delivered networks land in [0.90, 1.00] x budget; {over} over it."]
    lines += [f"- budget {r['budget_ms']:g}: {r['note']}" for r in done if r["note"]]
    lines += [f"- budget {r['budget_ms']:g} FAILED: {r['error']}" for r in rows if "error" in r]
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    _plot(done, out / "sweep.png")


def _plot(rows: list[dict], path: Path) -> None:
    from flexslim.system.plots import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [r for r in rows if r["accuracy"] is not None]
    if pts:
        ax.plot([r["delivered_ms"] for r in pts], [r["accuracy"] for r in pts], "o-", label="delivered network")
    for r in rows:
        ax.axvline(r["budget_ms"], color="r", ls=":", lw=0.8)
    ax.set_xlabel("latency p90 (ms / sample), median of the gate's measurements")
    ax.set_ylabel("test accuracy")
    ax.set_title("flexslim sweep: accuracy vs latency (dotted: the budgets)")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    save_png(fig, path)
