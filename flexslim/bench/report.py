"""The bench's report: statistics over seeds (mean ± std), the verdicts on the paper's claims (saying when a
difference is inside the noise), and bench.md, bench.csv, bench.json and bench.png."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from flexslim.data.synthetic import is_synthetic
from flexslim.system.files import atomic_write_json, atomic_write_text

WINDOW_STEPS = 3  # search steps in the tensor-memory window (after one unmeasured step)

STATS = (
    "measured_ms",
    "predicted_ms",
    "search_seconds",
    "seconds_per_epoch",
    "latency_seconds",
    "tensor_peak_mb",
    "cuda_max_allocated_mb",
    "peak_mb",
    "search_mb",
    "acc_supernet",
    "acc_retrained",
    "mflops",
    "params_k",
    "search_gmacs",
    "train_gmacs",
    "total_gmacs",
    "train_seconds",
)


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """(mean, sample std; 0 for one value) of the values that are numbers, None when there are none."""
    v = [float(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]
    if not v:
        return None
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per method: {"runs", "failed", "met", "widths" (one per run), "dataset", and (mean, std) per STATS key}."""
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["method"], {"runs": 0, "failed": 0, "met": 0, "widths": [], "dataset": None, "_rows": []})
        if "error" in r:
            s["failed"] += 1
            continue
        s["runs"] += 1
        s["met"] += bool(r["budget_met"])
        s["widths"].append(r["widths"])
        s["dataset"] = r.get("dataset")
        s["range_ms"] = r.get("range_ms")
        s["_rows"].append(r)
    for s in out.values():
        for key in STATS:
            s[key] = mean_std([r.get(key) for r in s["_rows"]])
        del s["_rows"]
    return out


def inside_noise(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool | None:
    """True when |mean_a - mean_b| < sqrt(std_a^2 + std_b^2) (None when both spreads are unknown: one run each).
    A side of one run (std 0) is given the other side's spread - the same retraining noise, not none: a single run
    compared with three seeds of 0.8384 +- 0.0095 is inside the noise within 1.34 points, not within 0.95."""
    if a is None or b is None or (a[1] == 0 and b[1] == 0):
        return None
    sa, sb = a[1] or b[1], b[1] or a[1]
    return abs(a[0] - b[0]) < math.hypot(sa, sb)


def _pm(ms: tuple[float, float] | None, fmt: str = ".1f") -> str:
    if ms is None:
        return "-"
    return f"{ms[0]:{fmt}}" + (f" ± {ms[1]:{fmt}}" if ms[1] else "")


def _noise_note(a, b) -> str:
    noise = inside_noise(a, b)
    if noise is None:
        return " (one run each: spread unknown, use --seeds)"
    return " - INSIDE the noise (|diff| < combined std)" if noise else " - outside the noise"


def _ratio_line(label: str, key: str, fc: dict, dl: dict, unit: str, better: str) -> str | None:
    a, b = dl.get(key), fc.get(key)
    if not a or not b or not b[0]:
        return None
    r = a[0] / b[0]
    return (
        f"{label}: DMask-large / FlexCHarts = {r:.2f}x ({_pm(a)} vs {_pm(b)} {unit}; "
        f"{'FlexCHarts ' + better if r > 1 else 'FlexCHarts NOT ' + better}){_noise_note(a, b)}."
    )


def verdicts(rows: list[dict]) -> list[str]:
    """The paper's claims, checked on this bench (means over the seeds), each said plainly, with the noise."""
    by = summarize(rows)
    fc, dl, ds, un = by.get("flexcharts"), by.get("dmask-large"), by.get("dmask-small"), by.get("uniform")
    lines = []

    def met(name: str, s: dict) -> str:
        n = s["runs"]
        word = "meets" if s["met"] == n else ("MISSES" if s["met"] == 0 else "meets only sometimes")
        return f"{name} {word} the budget in {s['met']}/{n} run(s) (p90 {_pm(s['measured_ms'], '.4f')} ms)"

    if fc and fc["runs"]:
        lines.append(met("FlexCHarts", fc) + ".")
    if fc and dl and fc["runs"] and dl["runs"]:
        for line in (
            _ratio_line("Search time", "search_seconds", fc, dl, "s", "faster"),
            _ratio_line("Tensor memory of the search", "tensor_peak_mb", fc, dl, "MB", "lower"),
            _ratio_line("GPU memory (max allocated)", "cuda_max_allocated_mb", fc, dl, "MB", "lower"),
            _ratio_line("Peak resident set", "peak_mb", fc, dl, "MB", "lower"),
        ):
            if line:
                lines.append(line)
    if dl and dl["runs"]:
        lines.append(met("DMask-large", dl) + ".")
    if ds and ds["runs"]:
        line = met("DMask-small", ds)
        rng, budget = ds.get("range_ms"), _budget_of(rows)
        if ds["met"] < ds["runs"] and rng and budget and rng[0] > budget:
            line += (
                f": its range cannot reach the budget - the narrowest network of its range is predicted "
                f"{rng[0]:.4f} ms > {budget:g} ms"
            )
        elif rng:
            line += f"; its range spans {rng[0]:.4f} - {rng[1]:.4f} ms predicted"
        lines.append(line + ".")
    if fc and un and fc["runs"] and un["runs"]:
        lines.append(_accuracy_line(fc, un))
    return lines


def _budget_of(rows: list[dict]) -> float | None:
    return next((r["budget_ms"] for r in rows if "budget_ms" in r), None)


def _accuracy_line(fc: dict, un: dict) -> str:
    if is_synthetic(fc.get("dataset") or ""):
        return "Accuracy vs uniform: n/a (synthetic data: accuracies are meaningless)."
    a, b = fc.get("acc_retrained"), un.get("acc_retrained")
    if a is None or b is None:
        return "Accuracy vs uniform: not measured (uniform has no supernet; pass --retrain)."
    d = a[0] - b[0]
    return (
        f"Accuracy vs uniform (retrained): FlexCHarts {_pm(a, '.4f')} vs uniform {_pm(b, '.4f')}, "
        f"difference {d:+.4f}{_noise_note(a, b)}."
    )


SUMMARY_COLUMNS = [
    ("widths", "widths"),
    ("measured_ms", "latency p90 (ms)"),
    ("predicted_ms", "predicted (ms)"),
    ("met", "budget met"),
    ("mflops", "MFLOPs"),
    ("params_k", "params (K)"),
    ("search_seconds", "search time (s)"),
    ("seconds_per_epoch", "s / epoch"),
    ("latency_seconds", "latency measuring (s)"),
    ("tensor_peak_mb", "tensor peak (MB)"),
    ("cuda_max_allocated_mb", "GPU max allocated (MB)"),
    ("peak_mb", "peak RSS (MB)"),
    ("search_gmacs", "search compute (GMACs)"),
    ("train_gmacs", "retrain compute (GMACs)"),
    ("acc_supernet", "acc, supernet"),
    ("acc_retrained", "acc, retrained"),
]
RUN_COLUMNS = [
    ("method", "method"),
    ("seed", "seed"),
    ("widths", "widths"),
    ("measured_ms", "latency p90 (ms)"),
    ("predicted_ms", "predicted (ms)"),
    ("budget_met", "budget met"),
    ("search_seconds", "search time (s)"),
    ("latency_seconds", "latency measuring (s)"),
    ("tensor_peak_mb", "tensor peak (MB)"),
    ("peak_mb", "peak RSS (MB)"),
    ("search_mb", "RSS rise (MB)"),
    ("search_gmacs", "search compute (GMACs)"),
    ("train_gmacs", "retrain compute (GMACs)"),
    ("train_epochs", "retrain epochs"),
    ("train_seconds", "retrain time (s)"),
    ("acc_supernet", "acc, supernet"),
    ("acc_retrained", "acc, retrained"),
]
FOUR_DIGITS = ("measured_ms", "predicted_ms", "acc_supernet", "acc_retrained")


def _widths(w: dict) -> str:
    return "/".join(str(x) for x in w.values())


def _summary_cell(key: str, s: dict) -> str:
    synthetic = is_synthetic(s.get("dataset") or "")
    if key.startswith("acc_") and synthetic:
        return "n/a (synthetic)"
    if key == "widths":
        distinct = list(dict.fromkeys(_widths(w) for w in s["widths"]))
        return ", ".join(distinct) or "-"
    if key == "met":
        return f"{s['met']}/{s['runs']}" + (f" ({s['failed']} failed)" if s["failed"] else "")
    return _pm(s.get(key), ".4f" if key in FOUR_DIGITS else ".1f")


def _run_cell(key: str, r: dict) -> str:
    v = r.get(key)
    if key.startswith("acc_") and is_synthetic(r.get("dataset") or ""):
        return "n/a (synthetic)"
    if v is None:
        return "-"
    if key == "budget_met":
        return "yes" if v else "NO"
    if key == "widths":
        return _widths(v)
    if isinstance(v, float):
        return f"{v:.4f}" if key in FOUR_DIGITS else f"{v:.1f}"
    return str(v)


def write_outputs(rows: list[dict], out: Path, budget: float, recipe: str) -> None:
    """bench.md (summary table over seeds, per-run table, verdicts), bench.csv (one line per run), bench.json and
    bench.png (accuracy vs latency) into `out`."""
    ok = [r for r in rows if "error" not in r]
    summary = summarize(rows)
    seeds = max((s["runs"] + s["failed"] for s in summary.values()), default=0)
    dataset = next((r.get("dataset") for r in ok), None)
    device = next((r.get("device") for r in ok), "?")
    lines = [
        f"# flexslim bench: {recipe}, budget {budget:g} ms/sample",
        "",
        f"Dataset {dataset}{' (random images: accuracy is meaningless)' if is_synthetic(dataset or '') else ''}; "
        f"training device {device}; {seeds} run(s) per method (seeds); mean ± std over the runs.",
        "",
        "| method | " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |",
        "|" + "---|" * (len(SUMMARY_COLUMNS) + 1),
    ]
    lines += [
        f"| {m} | " + " | ".join(_summary_cell(k, s) for k, _ in SUMMARY_COLUMNS) + " |"
        for m, s in summary.items()
        if s["runs"]
    ]
    lines += ["", "## Runs", "", "| " + " | ".join(t for _, t in RUN_COLUMNS) + " |", "|" + "---|" * len(RUN_COLUMNS)]
    lines += ["| " + " | ".join(_run_cell(k, r) for k, _ in RUN_COLUMNS) + " |" for r in ok]
    lines += [f"| {r['method']} | {r.get('seed')} | failed: {r['error']} |" for r in rows if "error" in r]
    source = next((r.get("tensor_source") for r in ok if r.get("tensor_source")), "n/a")
    lines += [
        "",
        "Latency: the gate's statistic (p90 per sample), measured once on the deployment runtime, of the searched "
        "widths as the search hands them over (untrimmed), next to the shared latency table's prediction. Search "
        "time: the search loop, without latency measurement (shown apart; uniform's bisection is all measurement). "
        f"Tensor peak: live tensors (parameters, buffers, optimizer state + the peak of one window of "
        f"{WINDOW_STEPS} search steps' activations and gradients) at the widest allocation the search used, from "
        f"{source}; the dataset in memory is not counted. Peak RSS: the process's peak resident set (allocator "
        "caches, oneDNN and onnxruntime buffers included). acc, supernet: the searched supernet (its own masks) on "
        "the test split; acc, retrained: the dense network retrained from scratch (--retrain).",
        "",
    ]
    lines += [f"- {v}" for v in verdicts(rows)]
    atomic_write_text(out / "bench.md", "\n".join(lines) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    keys = [k for k, _ in RUN_COLUMNS] + ["seconds_per_epoch", "cuda_max_allocated_mb", "mflops", "params_k", "dataset"]
    w.writerow(keys)
    for r in ok:
        w.writerow([json.dumps(r.get(k)) if isinstance(r.get(k), dict) else r.get(k) for k in keys])
    atomic_write_text(out / "bench.csv", buf.getvalue())
    atomic_write_json(out / "bench.json", rows)
    if ok:
        _plot(ok, out / "bench.png", budget)


def _plot(rows: list[dict], path: Path, budget: float) -> None:
    from flexslim.system.plots import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for r in rows:
        acc = r.get("acc_retrained") if r.get("acc_retrained") is not None else r.get("acc_supernet")
        if is_synthetic(r.get("dataset") or ""):
            acc = 0.0  # meaningless: the plot only shows latency
        if acc is None:
            continue
        i = methods.index(r["method"])
        first = r is next(x for x in rows if x["method"] == r["method"])
        ax.scatter(
            r["measured_ms"],
            acc,
            s=60,
            color=f"C{i}",
            marker="o" if r["budget_met"] else "x",
            label=(
                f"{r['method']} ({'retrained' if r.get('acc_retrained') is not None else 'supernet weights'})"
                if first
                else None
            ),
        )
    ax.axvline(budget, color="r", ls="--", label="budget")
    ax.set_xlabel("latency p90 (ms / sample)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs latency (x = budget missed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
