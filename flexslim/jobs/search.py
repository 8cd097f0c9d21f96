"""The `flexslim search` job as named stages over one run record: prepare the run (`jobs.run_folder`) -> latency
model -> search (or reuse a finished one) -> bake and fit to the budget -> retrain (or reuse) -> the release ONNX.

    runs/X/recipe.toml     resolved recipe
    runs/X/run.json        budget, latency settings, status, measured latency, trims, what the latency cache
                           served (`latency_cache_*`, `bake_cache_*`: hits and networks timed; through RunRecord)
    runs/X/latency.json    the latency model (reused by --resume; --latency-table brings another)
    runs/X/search.jsonl    one line per search epoch;  search.png  the trajectory
    runs/X/arch.json       the baked widths (after trimming);  model.pt  the retrained network
Each stage reads only what the previous one wrote, so an interrupted run continues with --resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flexslim.data.sources import load_dataset
from flexslim.data.tensors import Dataset
from flexslim.errors import BadInput, GateFailed
from flexslim.jobs.latency import latency_stage, log_cache_use
from flexslim.jobs.run_folder import check_run, open_run
from flexslim.latency import cache as latency_cache
from flexslim.latency.budget import Budget
from flexslim.latency.fingerprint import measuring_device
from flexslim.latency.model import LatencyModel, with_grid
from flexslim.models.arch import Arch, arch_json, load_arch
from flexslim.recipe.schema import Recipe
from flexslim.search.bake import BakePlan, Fitted, bake
from flexslim.search.desk import predicted_by
from flexslim.system import distributed
from flexslim.system.console import Reporter
from flexslim.system.files import atomic_write_text, drop_torn_line, read_jsonl, remove
from flexslim.system.memory import SearchMemory
from flexslim.system.runs import (
    RunRecord,
    mark_latest,
)


@dataclass(frozen=True)
class JobResult:
    """What `search_job` hands back: the run, the baked architecture and every figure callers report.

    `memory` and `supernet_acc` are None when a finished search was reused; `test_acc` is None without
    retraining.
    """

    run_dir: Path
    arch: Arch
    fitted: Fitted
    latency: LatencyModel
    history: list[dict]
    test_acc: float | None
    memory: dict | None = None
    supernet_acc: float | None = None
    latency_seconds: float = 0.0  # measuring: the latency model (what this run measured of it) and the bake

    @property
    def search_seconds(self) -> float:
        return sum(h["seconds"] for h in self.history)


@dataclass(frozen=True)
class Searched:
    """The outcome of the search stage (fresh or reused)."""

    arch: Arch
    fitted: Fitted
    history: list[dict]
    memory: dict | None = None
    supernet_acc: float | None = None


@dataclass(frozen=True)
class SearchRequest:
    """What the main job is asked to do (the flags of `flexslim search`).

    Attributes:
        budget_ms: per-sample latency budget (ms) at the recipe's percentile on its provider.
        recipe: shipped recipe name or .toml path (ignored with `resume`: the run's own recipe is used).
        overrides: `section.key=value` strings applied to the recipe.
        data_dir: where the dataset is read (`--data`).
        run_dir: the run directory (default `runs/<time>-<recipe>`; with `resume`, the newest search started here,
            `runs/.started`, else `runs/latest`).
        device: auto, cpu or cuda (training).
        latency_table: a latency.json from `flexslim profile` to use instead of measuring here.
        retrain: retrain the baked network from scratch (model.pt).
        resume: continue the interrupted (or finished) run in `run_dir`.
        mark: point `runs/.started` at the run when it is created and `runs/latest` when the job finishes.
        release_onnx: after retraining, convert model.pt into the run's model.onnx while torch is loaded
            (`jobs.export.write_run_onnx`): `flexslim export` then copies it (the CLI's search does; a sweep or a
            bench, which export nothing, do not).
    """

    budget_ms: float
    recipe: str = "quickstart"
    overrides: tuple[str, ...] = ()
    data_dir: Path | None = None
    run_dir: Path | None = None
    device: str = "auto"
    latency_table: Path | None = None
    retrain: bool = True
    resume: bool = False
    mark: bool = True
    release_onnx: bool = False


@dataclass(frozen=True)
class _OpenRun:
    """A run whose inputs were checked and whose folder is open: what every later stage works on."""

    arch: Arch
    recipe: Recipe
    ds: Dataset
    record: RunRecord
    dev: object  # torch.device
    reporter: Reporter
    resume: bool


def search_job(request: SearchRequest, reporter: Reporter | None = None) -> JobResult:
    """The main job: search per-stage widths for `request.budget_ms`, bake, fit to the budget, retrain.

    Returns:
        JobResult. Raises BadInput for unusable input (exit 2), including a budget below the family's floor.

    Example::

        res = search_job(SearchRequest(0.06, recipe="quickstart", retrain=False))
        res.arch.widths, res.fitted.measured_ms
    """
    from flexslim.system.devices import pick_device

    reporter = reporter or Reporter()
    dev = pick_device(request.device)
    rcp, ds, arch, table, record = _checked_and_opened(request, str(dev))
    lat, budget = distributed.on_main(
        lambda: latency_stage(arch, rcp, record, table, request.budget_ms, reporter, resume=request.resume)
    )
    run = _OpenRun(arch, with_grid(rcp, lat), ds, record, dev, reporter, request.resume)
    done = distributed.on_main(lambda: _finished_search(record)) if request.resume else None
    if done is not None:
        reporter.log(f"search already finished: widths {done.arch.widths}")
    s = done or _search_stage(run, budget, lat)
    test_acc = _retrain_stage(run, s.arch) if request.retrain else None
    if request.retrain and request.release_onnx:
        distributed.on_main(lambda: _release_onnx(record, reporter))
    if request.mark:  # only now: a bare `export` never picks a run that is still being written
        distributed.on_main(lambda: mark_latest(record.run_dir))
    return JobResult(
        record.run_dir,
        s.arch,
        s.fitted,
        lat,
        s.history,
        test_acc,
        s.memory,
        s.supernet_acc,
        record.get("latency_seconds", 0.0),
    )


def _checked_and_opened(req: SearchRequest, dev: str):
    """Every input checked (recipe, data, latency table) before the run directory is created or reopened ->
    (recipe, dataset, arch, table path, run record). Under torchrun every rank checks its recipe against rank 0's
    and rank 0 prepares the run (it also measures and bakes; every rank searches and retrains its shards)."""
    table = distributed.on_main(lambda: _checked_table(req.latency_table))
    check = lambda: check_run(req)  # noqa: E731
    distributed.check_recipe(lambda: check()[0], train=req.retrain)
    rcp, run_path = distributed.on_main(check)
    with distributed.main_first():  # a download happens once
        ds = load_dataset(rcp.data, req.data_dir)
    arch = Arch.for_data(rcp.model, ds)
    own = run_path / "latency.json" if req.resume and run_path is not None else None
    for path in (table, own if own is not None and own.is_file() else None):
        if path is not None:  # a table for another network or setting is refused before the run is touched
            LatencyModel.load(path).check_compatible(arch, rcp.latency, str(path))
    record = distributed.on_main(lambda: open_run(rcp, run_path, req, dev))
    return rcp, ds, arch, table, record


def _checked_table(latency_table: Path | None) -> Path | None:
    if latency_table is None:
        return None
    path = Path(latency_table).resolve()  # before runs/latest moves
    if not path.is_file():
        raise BadInput(f"latency table {path} does not exist")
    return path


# -- stage 3: search (or reuse a finished one) and bake -------------------------------------------------------
def _finished_search(record: RunRecord) -> Searched | None:
    """The finished search of a resumed run (arch.json written, status searched or done), else None."""
    if not record.search_finished():
        return None
    baked = load_arch(record.run_dir / "arch.json")
    fitted = Fitted(
        baked.widths,
        record["measured_ms"],
        record.get("measured_p50_ms", 0.0),
        record["latency"]["provider"],
        record.get("trims", []),
        record.get("bake", []),
        record.get("window_note", ""),
    )
    return Searched(baked, fitted, read_jsonl(record.run_dir / "search.jsonl"))


def _search_stage(run: _OpenRun, budget: Budget, lat: LatencyModel) -> Searched:
    """Run the search, write search.jsonl and search.png, bake and fit the widths, record it all."""
    from flexslim.search.capability import SupernetScore
    from flexslim.search.loop import SearchFolder, run_search

    arch, recipe, ds, record, dev, reporter = run.arch, run.recipe, run.ds, run.record, run.dev, run.reporter
    run_dir = record.run_dir
    if not run.resume:
        remove(run_dir / "search.jsonl")
    else:  # a kill mid-append left half a line: the next epoch's line must start a line of its own
        drop_torn_line(run_dir / "search.jsonl")
    memory = SearchMemory(dev)
    memory.start()
    st = run_search(
        arch,
        recipe,
        ds.to(dev),
        budget=budget,
        latency=lat,
        device=dev,
        folder=SearchFolder(run_dir, resume=run.resume),
        reporter=reporter,
    )
    memory_info = memory.stop()
    supernet_acc = _supernet_accuracy(st.supernet, ds, recipe, dev)
    _write_search_outputs(st.history, run_dir, f"{recipe.search.method} search for {budget.ms:g} ms ({recipe.name})")
    centers = st.averaged_widths() or st.supernet.mean_widths()
    score = SupernetScore(st.supernet, ds, recipe, dev) if recipe.search.bake_rank == "supernet" else None
    before = latency_cache.tally()
    fitted = distributed.on_main(lambda: _bake(arch, centers, budget, lat, recipe, reporter, score))
    cached = latency_cache.tally() - before  # the bake runs on rank 0, which alone writes run.json
    log_cache_use(cached, reporter)
    baked = arch.with_widths(fitted.widths)
    atomic_write_text(run_dir / "arch.json", arch_json(baked))
    _save_searched_weights(st.supernet, baked, recipe, run_dir, ds, dev)
    _record_search(
        record,
        centers,
        fitted,
        budget,
        st.history,
        memory=memory_info,
        supernet_test_acc=supernet_acc,
        bake_cache_hits=cached.hits,
        bake_cache_misses=cached.misses,
    )
    remove(run_dir / "search_state.pt")
    reporter.log(
        f"searched widths { ({k: round(v, 1) for k, v in centers.items()}) } -> baked {fitted.widths}: measured "
        f"p{recipe.latency.percentile:g} {fitted.measured_ms:.4f} ms = {fitted.measured_ms / budget.ms:.3f} x budget "
        f"{budget.ms:g} ms ({fitted.measurements} networks measured)" + (f"; {fitted.note}" if fitted.note else "")
    )
    return Searched(baked, fitted, st.history, memory_info, supernet_acc)


def _bake(arch: Arch, centers: dict, budget: Budget, lat: LatencyModel, recipe: Recipe, reporter, score) -> Fitted:
    """The measured bake of the searched widths (the same for every method; `search.trim = false`: measure only),
    capability-ranked inside the window by `score` when given. A table measured on another device than this job
    measures on: ranked by the table alone (`desk.predicted_by`), nothing measured here."""
    plan = BakePlan.for_recipe(recipe)
    if lat.measured_elsewhere(measuring_device(recipe.latency)):  # nothing measured here may decide its latency
        plan = replace(plan, confidence=None)
        measure = predicted_by(lat)
        return bake(
            arch, centers, budget=budget, latency=lat, plan=plan, measure=measure, reporter=reporter, score=score
        )
    return bake(arch, centers, budget=budget, latency=lat, plan=plan, reporter=reporter, score=score)


def _supernet_accuracy(supernet, ds: Dataset, recipe: Recipe, dev) -> float:
    """The searched supernet's test accuracy with its own masks, after its BatchNorm statistics are recalibrated on
    D_t (in place: the searched weights saved for users who skip retraining carry them too). Reported only; the
    test set is never searched on."""
    from flexslim.train.loop import evaluate_batches, recalibrate

    d_t, _ = ds.search_halves(recipe.data.split_seed)
    model = recalibrate(supernet, d_t.train_batches(recipe.search.batch_size), dev)
    return evaluate_batches(model, ds.test_batches(), dev)[1]


def _record_search(record: RunRecord, centers: dict, fitted: Fitted, budget: Budget, history: list[dict], **extra):
    """What the search and the bake hand on, in run.json (search time without any latency measurement)."""
    record.update(
        status="searched",
        searched_widths=centers,
        widths=fitted.widths,
        measured_ms=fitted.measured_ms,
        measured_p50_ms=fitted.p50_ms,
        budget_met=fitted.measured_ms <= budget.ms,
        in_window=budget.in_window(fitted.measured_ms),
        window_note=fitted.note,
        budget=(fitted.budget or budget).as_dict(),  # the bake's (headroom from its own sessions): what the run met
        bake_headroom=(fitted.budget or budget).headroom,
        headroom_floor=fitted.floor,  # how far re-timings moved on this device (None: the prior, or nothing measured)
        trims=fitted.trims,
        bake=fitted.steps,
        bake_screens=fitted.screens,
        bake_seconds=fitted.seconds,
        search_seconds=sum(h["seconds"] for h in history),
        latency_seconds=record.get("latency_seconds", 0.0) + fitted.seconds,
        **extra,
    )


def _write_search_outputs(history: list[dict], run_dir: Path, title: str) -> None:
    """search.jsonl (whole, once more: resumed runs append) and search.png."""
    from flexslim.system.plots import plot_search

    atomic_write_text(run_dir / "search.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    plot_search(history, run_dir / "search.png", title)


def _save_searched_weights(supernet, baked: Arch, recipe: Recipe, run_dir: Path, ds: Dataset, dev) -> None:
    """supernet_baked.pt: the searched weights sliced to the baked widths, for users who skip retraining, with
    BatchNorm statistics recalibrated on D_t for the dense widths (the supernet's were gathered under soft masks)."""
    from flexslim.train.checkpoint import save_model
    from flexslim.train.loop import recalibrate

    _, dense = supernet.dense(baked.widths)
    d_t, _ = ds.search_halves(recipe.data.split_seed)
    recalibrate(dense, d_t.train_batches(recipe.search.batch_size), dev)
    save_model(run_dir / "supernet_baked.pt", baked, dense, recipe, {"note": "weights sliced from the supernet"})


def _release_onnx(record: RunRecord, reporter: Reporter) -> None:
    """The run's model.onnx (`write_run_onnx`); a parity failure is logged and left to `flexslim export`, which
    converts again and fails with it."""
    from flexslim.jobs.export import run_onnx_current, write_run_onnx

    if run_onnx_current(record.run_dir, record):  # a resumed finished run
        return
    try:
        result = write_run_onnx(record.run_dir, record)
    except GateFailed as err:
        reporter.log(f"release ONNX not written: {err}")
        return
    reporter.log(f"release ONNX {result.path} (parity {result.parity_max_abs:.1e}): `flexslim export` copies it")


# -- stage 4: retrain (or reuse) ------------------------------------------------------------------------------
def _retrain_stage(run: _OpenRun, baked: Arch) -> float:
    """Retrain the baked network from scratch into model.pt (a finished retraining is reused on resume)."""
    from flexslim.jobs.train import train_arch

    recipe, ds, record, dev, reporter = run.recipe, run.ds, run.record, run.dev, run.reporter
    if run.resume and record.get("status") == "done" and distributed.on_main((record.run_dir / "model.pt").is_file):
        reporter.log(f"retraining already finished: {record.run_dir / 'model.pt'}")
        return record.get("test_acc")
    t0 = time.perf_counter()
    history = train_arch(baked, recipe, record.run_dir, ds, dev, reporter=reporter, resume=run.resume)
    record.update(status="done", test_acc=history[-1].test_acc, train_seconds=time.perf_counter() - t0)
    return history[-1].test_acc
