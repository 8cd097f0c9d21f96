"""`flexslim bench`: every method on the same recipe, data, budget, latency table and seed, each in its
own process (so peak memory is its own), then a table shaped like the paper's Table 1, a CSV and an
accuracy-vs-latency PNG.

Methods: flexcharts | dmask-small | dmask-large (DMaskingNAS over the recipe's small / large fixed range) |
uniform (one width multiplier, bisection on measured latency). Searches are NOT trimmed here: the table
shows what each method found. Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the
process's peak resident set (ru_maxrss) and its rise over the resident set just before the search.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.memory import SearchMemory
from flexslim.runs import atomic_write_bytes, atomic_write_json, atomic_write_text

METHODS = ("flexcharts", "dmask-small", "dmask-large", "uniform")


def _method_overrides(method: str) -> list[str]:
    if method == "flexcharts":
        return ["search.method=flexcharts", "search.trim=false"]
    if method in ("dmask-small", "dmask-large"):
        return ["search.method=dmask", f"search.dmask_range={method.split('-')[1]}", "search.trim=false"]
    raise BadInput(f"unknown bench method '{method}'; valid: {', '.join(METHODS)}")


def network_stats(arch) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flexslim.spaces import build_network

    net = build_network(arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.rand(1, *arch.input_shape))
    return {"mflops": counter.get_total_flops() / 1e6, "params_k": sum(p.numel() for p in net.parameters()) / 1e3}


def worker(spec: dict) -> dict:
    """One method, in this (fresh) process. Returns the row for the table."""

    from flexslim.config import load_recipe
    from flexslim.data import load_dataset
    from flexslim.devices import pick_device

    method, budget, out = spec["method"], spec["budget_ms"], Path(spec["out"])
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    dev = pick_device(spec["device"])
    ds = load_dataset(recipe.data, spec.get("data"))  # warm the data path so the baseline includes it
    memory = SearchMemory(dev)  # uniform's "search" is its bisection; the others record their own loop
    memory.start()
    t0 = time.perf_counter()
    row: dict = {"method": method, "budget_ms": budget}
    if method == "uniform":
        from flexslim.arch import Arch
        from flexslim.latency import LatencyModel
        from flexslim.uniform import uniform_scale

        arch = Arch.from_model(recipe.model, ds.input_shape, ds.num_classes, ds.name, ds.mean, ds.std, ds.class_names)
        LatencyModel.load(spec["latency_table"]).check_compatible(arch, recipe.latency, spec["latency_table"])
        res = uniform_scale(
            arch, budget, recipe.latency, recipe.model.min_width, recipe.model.round_to, recipe.search.trim_margin
        )
        baked = arch.with_widths(res.widths)
        row.update(search_seconds=res.seconds, measured_ms=res.measured_ms, multiplier=res.multiplier, **memory.stop())
        acc_supernet = None
        run_dir = out / method
        run_dir.mkdir(parents=True, exist_ok=True)
        test_acc = None
        if spec["retrain"]:
            from flexslim.train import train_arch

            test_acc = train_arch(baked, recipe, run_dir, ds, dev)[-1].test_acc
    else:
        from flexslim.pipeline import read_json, search_job

        res = search_job(
            budget,
            spec["recipe"],
            spec["overrides"] + _method_overrides(method),
            spec.get("data"),
            out / method,
            spec["device"],
            Path(spec["latency_table"]),
            retrain=spec["retrain"],
            mark=False,
        )
        baked = res.arch
        row.update(
            search_seconds=sum(h["seconds"] for h in res.history),
            measured_ms=res.fitted.measured_ms,
            allocated=res.history[-1]["allocated"] if res.history else None,
        )
        info = read_json(res.run_dir / "run.json")
        row.update(info["memory"])
        acc_supernet = info["supernet_test_acc"]
        test_acc = res.test_acc
    wall = time.perf_counter() - t0
    row.update(
        widths=baked.widths,
        budget_met=row["measured_ms"] <= budget,
        wall_seconds=wall,
        acc_supernet=acc_supernet,
        acc_retrained=test_acc,
        device=str(dev),
        **network_stats(baked),
    )
    return row


def run_bench(
    recipe_name: str,
    methods: list[str] | None,
    out: Path,
    budget_ms: float | None = None,
    retrain: bool | None = None,
    overrides: list[str] | None = None,
    data_dir: Path | None = None,
    device: str = "auto",
    log=print,
) -> list[dict]:
    from flexslim.config import load_recipe
    from flexslim.pipeline import profile_job

    overrides = list(overrides or [])
    recipe = load_recipe(recipe_name, overrides)
    methods = list(methods or recipe.bench.methods)
    for m in methods:
        if m != "uniform":
            _method_overrides(m)
    budget = budget_ms if budget_ms is not None else recipe.bench.latency_ms
    if not budget or budget <= 0:
        raise BadInput(f"recipe {recipe.name} sets no bench.latency_ms; pass --latency-ms")
    retrain = recipe.bench.retrain if retrain is None else retrain
    out.mkdir(parents=True, exist_ok=True)
    table = out / "latency.json"
    log(f"bench {recipe.name}: budget {budget:g} ms, methods {', '.join(methods)}; measuring the shared latency table")
    t0 = time.perf_counter()
    model = profile_job(recipe_name, overrides, table, data_dir)
    if budget < model.floor_ms:
        raise BadInput(
            f"--latency-ms {budget:g} is below the family's floor {model.floor_ms:.4f} ms on {model.provider}"
        )
    log(
        f"latency table: {time.perf_counter() - t0:.0f}s, hold-out error median "
        f"{model.error_summary().get('median_pct', 0):.1f}%, floor {model.floor_ms:.4f} ms"
    )
    rows = []
    for m in methods:
        spec = {
            "method": m,
            "recipe": recipe_name,
            "overrides": overrides,
            "budget_ms": budget,
            "out": str(out),
            "latency_table": str(table),
            "retrain": retrain,
            "device": device,
            "data": str(data_dir) if data_dir else None,
        }
        result = out / f"{m}.json"
        result.unlink(missing_ok=True)
        shutil.rmtree(out / m, ignore_errors=True)  # a fresh run directory per method
        log(f"-> {m} (own process)")
        proc = subprocess.run(
            [sys.executable, "-m", "flexslim.bench", json.dumps(spec), str(result)], capture_output=True, text=True
        )
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            rows.append({"method": m, "error": " | ".join(tail)})
            log(f"   {m} failed: {' | '.join(tail)}")
            continue
        row = json.loads(result.read_text())
        rows.append(row)
        log(
            f"   {m}: widths {row['widths']}, {row['measured_ms']:.4f} ms "
            f"({'met' if row['budget_met'] else 'MISSED'}), "
            f"search {row['search_seconds']:.0f}s, peak {row['peak_mb']:.0f} MB"
        )
    write_outputs(rows, out, budget, recipe.name)
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """The paper's claims, checked on this run, each said plainly."""
    by = {r["method"]: r for r in rows if "error" not in r}
    lines = []
    fc, dl, ds = by.get("flexcharts"), by.get("dmask-large"), by.get("dmask-small")
    if fc:
        lines.append(f"FlexCHarts {'meets' if fc['budget_met'] else 'MISSES'} the budget ({fc['measured_ms']:.4f} ms).")
    if fc and dl:
        t = dl["search_seconds"] / fc["search_seconds"]
        lines.append(
            f"Search time: DMask-large / FlexCHarts = {t:.2f}x "
            f"({'FlexCHarts faster' if t > 1 else 'FlexCHarts NOT faster'})."
        )
        key = "search_mb" if fc.get("search_mb") is not None else "peak_mb"
        if fc.get(key) and dl.get(key):
            m = dl[key] / fc[key]
            lines.append(
                f"Search memory ({'rise over baseline RSS' if key == 'search_mb' else 'peak'}): DMask-large / "
                f"FlexCHarts = {m:.2f}x ({'FlexCHarts lower' if m > 1 else 'FlexCHarts NOT lower'}); "
                f"peak: {dl['peak_mb']:.0f} vs {fc['peak_mb']:.0f} MB."
            )
    if dl:
        lines.append(
            f"DMask-large {'meets' if dl['budget_met'] else 'MISSES'} the budget ({dl['measured_ms']:.4f} ms)."
        )
    if ds:
        lines.append(
            f"DMask-small {'misses' if not ds['budget_met'] else 'MEETS'} the budget ({ds['measured_ms']:.4f} ms)"
            + (" - its range cannot reach the widths the budget needs." if not ds["budget_met"] else ".")
        )
    return lines


COLUMNS = [
    ("method", "method"),
    ("widths", "widths"),
    ("measured_ms", "latency p90 (ms)"),
    ("budget_met", "budget met"),
    ("mflops", "MFLOPs"),
    ("params_k", "params (K)"),
    ("search_seconds", "search time (s)"),
    ("peak_mb", "peak memory (MB)"),
    ("search_mb", "search memory (MB)"),
    ("acc_supernet", "acc, supernet"),
    ("acc_retrained", "acc, retrained"),
]


def _fmt(key, v) -> str:
    if v is None:
        return "-"
    if key == "budget_met":
        return "yes" if v else "NO"
    if key == "widths":
        return "/".join(str(x) for x in v.values())
    if isinstance(v, float):
        return f"{v:.4f}" if key in ("measured_ms", "acc_supernet", "acc_retrained") else f"{v:.1f}"
    return str(v)


def write_outputs(rows: list[dict], out: Path, budget: float, recipe: str) -> None:
    ok = [r for r in rows if "error" not in r]
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [f"# flexslim bench: {recipe}, budget {budget:g} ms/sample", "", head, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in ok]
    lines += [f"| {r['method']} | failed: {r['error']} |" for r in rows if "error" in r]
    kind = ok[0].get("kind", "") if ok else ""
    lines += [
        "",
        f"Memory: {kind}; on the CPU, search memory = rise of the peak resident set over its level just "
        "before the search loop (each method in a fresh process). Search time: the search loop (uniform: its "
        "bisection). Latency: the gate's statistic (p90 per sample) of the searched, untrimmed widths. "
        "acc, supernet: the searched supernet (soft masks) on the test split, after the search; "
        "acc, retrained: the dense network retrained from scratch (--retrain).",
        "",
    ]
    lines += [f"- {v}" for v in verdicts(rows)]
    atomic_write_text(out / "bench.md", "\n".join(lines) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([k for k, _ in COLUMNS])
    for r in ok:
        w.writerow([json.dumps(r.get(k)) if isinstance(r.get(k), dict) else r.get(k) for k, _ in COLUMNS])
    atomic_write_text(out / "bench.csv", buf.getvalue())
    atomic_write_json(out / "bench.json", rows)
    if ok:
        _plot(ok, out / "bench.png", budget)


def _plot(rows: list[dict], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, r in enumerate(rows):
        acc = r.get("acc_retrained") if r.get("acc_retrained") is not None else r.get("acc_supernet")
        if acc is None:
            continue
        ax.scatter(
            r["measured_ms"],
            acc,
            s=60,
            color=f"C{i}",
            marker="o" if r["budget_met"] else "x",
            label=f"{r['method']} ({'retrained' if r.get('acc_retrained') is not None else 'supernet weights'})",
        )
    ax.axvline(budget, color="r", ls="--", label="budget")
    ax.set_xlabel("latency p90 (ms / sample)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy vs latency (x = budget missed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":  # the per-method worker process
    spec_json, result_path = sys.argv[1], Path(sys.argv[2])
    atomic_write_json(result_path, worker(json.loads(spec_json)))
