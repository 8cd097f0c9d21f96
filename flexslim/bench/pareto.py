"""`flexslim bench --floor-x 1.5,2.5,4`: the bench at several budgets (multiples of the family's measured floor) on
one shared latency table, then one table and one Pareto figure over them: retrained accuracy vs measured latency
per method, mean +- std over the seeds, with each method's delivered latency as a fraction of its budget.

    rows = run_budgets(BenchRequest("fashion", ("flexcharts", "uniform"), Path("b"), retrain=True, seeds=3),
                       multiples=(1.5, 2.5, 4.0))
    # b/latency.json, b/budget-1/bench.md ..., b/pareto.md, b/pareto.csv, b/pareto.json, b/pareto.png
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

from flexslim.bench.report import inside_noise, mean_std
from flexslim.bench.run import BenchRequest, run_bench
from flexslim.errors import BadInput
from flexslim.system.files import atomic_write_json, atomic_write_text

WINDOW = (0.90, 1.00)  # x budget: where every delivered network should measure


def budgets_for(floor_ms: float, multiples: tuple[float, ...]) -> list[float]:
    """The budgets (ms, 4 significant digits) at `multiples` x the floor; BadInput for a multiple <= 1."""
    if not multiples or any(not m > 1.0 for m in multiples):
        raise BadInput(f"--floor-x takes multiples of the floor > 1 (e.g. 1.5,2.5,4), got {list(multiples)}")
    return [float(f"{m * floor_ms:.4g}") for m in multiples]


def run_budgets(request: BenchRequest, multiples: tuple[float, ...], log=print) -> list[dict]:
    """The bench at every budget of `multiples` x the floor, all sharing `out/latency.json` (measured once here
    near every budget, or `request.latency_table`) -> every run's row (with its budget), and the Pareto outputs."""
    from flexslim.latency.model import LatencyModel

    budgets_for(1.0, multiples)  # checked before anything is measured
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    table = out / "latency.json"
    if request.latency_table is not None:
        model = LatencyModel.load(request.latency_table)
        if Path(request.latency_table).resolve() != table.resolve():
            model.save(table)
    else:
        model = _measured_table(request, multiples, table, log)
    budgets = budgets_for(model.floor_ms, multiples)
    log(f"bench budgets (ms): {', '.join(f'{b:g}' for b in budgets)} = {list(multiples)} x floor {model.floor_ms:.4f}")
    rows: list[dict] = []
    for i, b in enumerate(budgets):
        sub = replace(request, out=out / f"budget-{i + 1}", budget_ms=b, latency_table=table)
        rows += [{**r, "budget_index": i + 1} for r in run_bench(sub, log=log)]
        write_pareto(rows, out, request.recipe, model.floor_ms)
    return rows


def _measured_table(request: BenchRequest, multiples: tuple[float, ...], table: Path, log) -> object:
    """Profile the family (the box), then measure the table near every budget of `multiples` x its floor."""
    from flexslim.jobs.latency import profile_job
    from flexslim.latency.model import with_grid
    from flexslim.latency.profiling import refine
    from flexslim.recipe.schema import load_recipe

    log(f"bench {request.recipe}: measuring the shared latency table")
    overrides = list(request.overrides)
    model = profile_job(request.recipe, overrides, table, data_dir=request.data_dir)
    budgets = budgets_for(model.floor_ms, multiples)
    refine(model, budgets, grid=with_grid(load_recipe(request.recipe, overrides), model).model.round_to)
    model.save(table)
    return model


def pareto_summary(rows: list[dict]) -> list[dict]:
    """Per (budget, method): runs, widths, measured latency and its ratio to the budget, accuracy (mean, std), and
    how many runs landed in the window."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["budget_ms"], r["method"]), []).append(r)
    out = []
    for (budget, method), rs in sorted(groups.items()):
        ratios = [r["measured_ms"] / budget for r in rs]
        out.append(
            {
                "budget_ms": budget,
                "method": method,
                "runs": len(rs),
                "widths": [r["widths"] for r in rs],
                "measured_ms": mean_std([r["measured_ms"] for r in rs]),
                "ratio": mean_std(ratios),
                "in_window": sum(WINDOW[0] <= x <= WINDOW[1] for x in ratios),
                "acc_retrained": mean_std([r.get("acc_retrained") for r in rs]),
                "search_gmacs": mean_std([r.get("search_gmacs") for r in rs]),
                "total_gmacs": mean_std([r.get("total_gmacs") for r in rs]),  # search + retraining
            }
        )
    return out


def _pm(v, fmt: str) -> str:
    return "-" if v is None else f"{v[0]:{fmt}} ± {v[1]:{fmt}}"


def write_pareto(rows: list[dict], out: Path, recipe: str, floor_ms: float) -> None:
    """pareto.md (one line per budget and method, and FlexCHarts vs each other method per budget), pareto.csv,
    pareto.json and pareto.png (accuracy vs latency with error bars)."""
    summary = pareto_summary(rows)
    lines = [
        f"# flexslim bench over budgets: {recipe} (floor {floor_ms:.4f} ms)",
        "",
        "Every network went through the same measured bake to the window [0.90, 1.00] x budget before retraining; "
        "latency is the bake's measurement (the gate's statistic), accuracy the retrained test accuracy; mean ± std "
        "over the runs (seeds).",
        "",
        "Compute: images x multiply-accumulates (forward + backward = 3 forward passes) of the search and of the "
        "retraining together, in 1e9 MACs (`flexslim.bench.compute`).",
        "",
        "| budget (ms) | x floor | method | runs | widths | latency p90 (ms) | / budget | in window | compute (GMACs) "
        "| accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        widths = "; ".join("/".join(str(v) for v in w.values()) for w in s["widths"])
        lines.append(
            f"| {s['budget_ms']:g} | {s['budget_ms'] / floor_ms:.2f} | {s['method']} | {s['runs']} | {widths} | "
            f"{_pm(s['measured_ms'], '.4f')} | {_pm(s['ratio'], '.3f')} | {s['in_window']}/{s['runs']} | "
            f"{_pm(s['total_gmacs'], '.0f')} | {_pm(s['acc_retrained'], '.4f')} |"
        )
    lines += ["", *[f"- {v}" for v in pareto_verdicts(summary)]]
    atomic_write_text(out / "pareto.md", "\n".join(lines) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["budget_ms", "method", "runs", "measured_ms", "measured_std", "ratio", "acc", "acc_std", "in_window",
                "total_gmacs", "search_gmacs"])  # fmt: skip
    for s in summary:
        m, a, q = s["measured_ms"] or (None, None), s["acc_retrained"] or (None, None), s["ratio"] or (None,)
        c, sc = s["total_gmacs"] or (None,), s["search_gmacs"] or (None,)
        w.writerow([s["budget_ms"], s["method"], s["runs"], m[0], m[1], q[0], a[0], a[1], s["in_window"], c[0], sc[0]])
    atomic_write_text(out / "pareto.csv", buf.getvalue())
    atomic_write_json(out / "pareto.json", {"recipe": recipe, "floor_ms": floor_ms, "summary": summary})
    if any(s["acc_retrained"] for s in summary):
        _plot(summary, out / "pareto.png", recipe)


def pareto_verdicts(summary: list[dict]) -> list[str]:
    """FlexCHarts' mean retrained accuracy minus each other method's, per budget, said with the noise."""
    lines = []
    for budget in sorted({s["budget_ms"] for s in summary}):
        here = {s["method"]: s for s in summary if s["budget_ms"] == budget}
        fc = here.get("flexcharts")
        if not fc or not fc["acc_retrained"]:
            continue
        for name, other in here.items():
            if name == "flexcharts" or not other["acc_retrained"]:
                continue
            d = fc["acc_retrained"][0] - other["acc_retrained"][0]
            noise = inside_noise(fc["acc_retrained"], other["acc_retrained"])
            said = " (inside the noise)" if noise else (" (outside the noise)" if noise is False else " (one run)")
            lines.append(f"{budget:g} ms: FlexCHarts vs {name}: {100 * d:+.2f} points{said}")
    return lines


def _plot(summary: list[dict], path: Path, recipe: str) -> None:
    from flexslim.system.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    for i, m in enumerate(methods):
        pts = [s for s in summary if s["method"] == m and s["acc_retrained"] and s["measured_ms"]]
        if not pts:
            continue
        ax.errorbar(
            [s["measured_ms"][0] for s in pts],
            [s["acc_retrained"][0] for s in pts],
            xerr=[s["measured_ms"][1] for s in pts],
            yerr=[s["acc_retrained"][1] for s in pts],
            fmt="o-",
            color=f"C{i}",
            capsize=3,
            label=m,
        )
    for b in sorted({s["budget_ms"] for s in summary}):
        ax.axvline(b, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("measured latency p90 (ms / sample)")
    ax.set_ylabel("retrained test accuracy")
    ax.set_title(f"{recipe}: accuracy vs latency (dotted: budgets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
