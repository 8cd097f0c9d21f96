"""Helpers for the distributed tests: start N ranks as spawned processes (torchrun's environment: RANK, WORLD_SIZE,
MASTER_ADDR/PORT, so flexslim joins the group exactly as under torchrun), collect what each returned, and never
wait for a hung rank past a deadline. The worker functions live here so the spawned processes can import them."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from flexslim.system import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        distributed.TIMEOUT_ENV: "60",  # a rank that waits longer than this in a collective is a test failure
    }


def launch(worker, world: int, tmp: Path, *args, timeout: float = 150.0) -> list[Any]:
    """Run worker(rank, world, tmp, *args) on `world` spawned ranks; returns each rank's return value. Fails when
    a rank raised (with its traceback) or is still running after `timeout` seconds (the ranks are killed)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(worker, r, world, port, str(tmp), args, timeout - 5)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    stacks = "\n".join(p.read_text() for p in sorted(tmp.glob("rank*.stacks.txt")))
    assert not hung, f"rank(s) {hung} still running after {timeout:.0f} s; their stacks:\n{stacks}"
    results = [torch.load(tmp / f"rank{r}.result.pt", weights_only=False) for r in range(world)]
    errors = [f"rank {r}: {value}" for r, (kind, value) in enumerate(results) if kind == "error"]
    assert not errors, "\n".join(errors)
    return [value for _, value in results]


def _rank_main(worker, rank: int, world: int, port: int, tmp: str, args: tuple, stacks_after: float) -> None:
    import atexit
    import faulthandler

    os.environ.update(rank_env(rank, world, port))
    stacks = open(Path(tmp) / f"rank{rank}.stacks.txt", "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(stacks_after, file=stacks)  # what a hung rank was doing
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as in conftest.py (oneDNN can hang on 4-channel 1x1 convs)
    try:
        out = ("ok", worker(rank, world, Path(tmp), *args))
    except BaseException:  # noqa: BLE001 - reported to the test
        out = ("error", traceback.format_exc())
    faulthandler.cancel_dump_traceback_later()
    atexit._run_exitfuncs()  # a multiprocessing child skips atexit: stop the latency timing helper, or exit waits on it
    torch.save(out, Path(tmp) / f"rank{rank}.result.pt")


# -- workers -----------------------------------------------------------------------------------------------------
def record_writes() -> list[str]:
    """From now on, every file flexslim's system.files and system.runs really write (os.replace of an atomic write,
    a JSON-lines append, the runs/latest pointer) is appended to the returned list, as a path."""
    import builtins
    import types

    from flexslim.system import files, runs

    writes: list[str] = []

    def replace(src, dst):
        writes.append(str(Path(dst).resolve()))
        return os.replace(src, dst)

    logged_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    logged_os.replace = replace

    def logged_open(path, mode="r", *a, **kw):
        if "a" in mode or "w" in mode:
            writes.append(str(Path(path).resolve()))
        return builtins.open(path, mode, *a, **kw)

    for module in (files, runs):
        module.os, module.open = logged_os, logged_open
    return writes


def search_job_worker(rank: int, world: int, tmp: Path, budget_ms: float, table: str, overrides: list[str]) -> dict:
    """`search_job` (search + bake + retrain) on this rank; returns the per-epoch mu/allocation it holds, the files
    it wrote and the result."""
    from flexslim.jobs.search import SearchRequest, search_job

    writes = record_writes()
    os.chdir(tmp)
    with distributed.session("cpu"):
        request = SearchRequest(
            budget_ms,
            recipe="quickstart",
            overrides=tuple(overrides),
            run_dir=tmp / "run",
            device="cpu",
            latency_table=Path(table),
            retrain=True,
        )
        res = search_job(request)
    keys = ("epoch", "mu", "allocated", "multiplier", "expected_widths", "weight_loss", "arch_ce")
    return {
        "history": [{k: h[k] for k in keys} for h in res.history],
        "writes": writes,
        "widths": res.arch.widths,
        "test_acc": res.test_acc,
    }


def one_search_step(overrides: list[str]) -> dict[str, torch.Tensor]:
    """Build the quickstart search state, do one weights step and one architecture step on the first global batch
    pair, and return the supernet's state (weights, BN statistics, mu) and the two losses."""
    from search_fixtures import hand_latency_model

    from flexslim.data.augment import Augment
    from flexslim.data.sources import load_dataset
    from flexslim.latency.budget import Budget
    from flexslim.models.arch import Arch
    from flexslim.recipe.schema import load_recipe
    from flexslim.search.loop import SearchLoop, arch_step, build_state, search_batches, weight_step
    from flexslim.system.console import Reporter

    recipe = load_recipe("quickstart", overrides)
    ds = load_dataset(recipe.data)
    arch = Arch.for_data(recipe.model, ds)
    cpu = torch.device("cpu")
    st = build_state(arch, recipe, cpu)
    bt, bs = search_batches(ds, recipe, 0)
    lat = hand_latency_model(arch, recipe.latency)
    budget = Budget(float(lat.predict(arch.widths)), headroom=0.05)
    loop = SearchLoop(recipe, budget, lat, cpu, Reporter(), min(len(bt), len(bs)))
    augment = Augment(recipe.data, seed=0)
    st.supernet.train()
    (xt, yt), (xs, ys) = next(iter(bt)), next(iter(bs))
    w_loss = weight_step(st, loop, augment, xt, yt)
    a_ce, _ = arch_step(st, loop, augment, xs, ys)
    state = {k: v.detach().clone() for k, v in st.supernet.state_dict().items()}
    return state | {"losses": torch.tensor([w_loss, a_ce], dtype=torch.float64)}


def one_step_worker(rank: int, world: int, tmp: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    with distributed.session("cpu"):
        return one_search_step(overrides)


def cli_worker(rank: int, world: int, tmp: Path, args_per_rank: list[list[str]]) -> tuple[int, str, str]:
    """`flexslim ARGS` on this rank (the CLI joins the group itself); returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from flexslim.cli import app

    os.chdir(tmp)
    result = CliRunner().invoke(app, args_per_rank[rank])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def quickstart_search(overrides: list[str], run_dir: Path | None, resume: bool = False, reporter=None):
    """run_search on the quickstart data with a hand-made latency model (no measuring); returns the SearchState."""
    from search_fixtures import hand_latency_model

    from flexslim.data.sources import load_dataset
    from flexslim.latency.budget import Budget
    from flexslim.models.arch import Arch
    from flexslim.recipe.schema import load_recipe
    from flexslim.search.loop import SearchFolder, run_search

    recipe = load_recipe("quickstart", overrides)
    ds = load_dataset(recipe.data)
    arch = Arch.for_data(recipe.model, ds)
    lat = hand_latency_model(arch, recipe.latency)
    budget = Budget(float(lat.predict(arch.widths)) / 0.9, headroom=0.05)
    return run_search(
        arch,
        recipe,
        ds,
        budget=budget,
        latency=lat,
        device=torch.device("cpu"),
        folder=SearchFolder(run_dir, resume) if run_dir is not None else None,
        reporter=reporter,
    )


def resume_search_worker(rank: int, world: int, tmp: Path, overrides: list[str]) -> dict:
    """Resume the search checkpointed in tmp/run on this rank; returns the final mu and allocation."""
    with distributed.session("cpu"):
        st = quickstart_search(overrides, tmp / "run", resume=True)
    return {"mu": st.supernet.mean_widths(), "allocated": st.supernet.allocated(), "epochs": st.epoch}
