"""Data-parallel runs (torchrun, gloo on this CPU): two ranks search and retrain in lockstep and write every file
once; one step on two ranks with synchronised BatchNorm equals one step on one rank with the same global batch;
bad input stops every rank with one message; a killed rank stops the job, and --resume under torchrun continues.

The ranks are spawned processes with torchrun's environment (dist_workers.launch), or torchrun itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_workers import (
    cli_worker,
    launch,
    one_search_step,
    one_step_worker,
    quickstart_search,
    resume_search_worker,
    search_job_worker,
)
from search_fixtures import FAST_SET, TINY_SET, hand_table, single_thread  # noqa: F401

import flexslim
from flexslim.system import collectives, distributed
from flexslim.system.console import Reporter

REPO = Path(flexslim.__file__).resolve().parents[1]
TINY = [*TINY_SET, *FAST_SET]


# -- single process: the identity ------------------------------------------------------------------------------
def test_without_torchrun_everything_is_the_single_process_path(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.init("cpu") is False
    assert distributed.on_main(lambda: 7) == 7
    x = torch.arange(6)
    assert collectives.shard(x) is x
    distributed.check_batch(7, "search.batch_size")  # any batch splits over one rank
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert collectives.average_gradients([p], 1, 2, [0.5]) == [0.5] and p.grad.tolist() == [3.0, 3.0]


def test_python_dash_m_flexslim_is_the_cli():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "flexslim", "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "search" in out.stdout


# -- done-when 1: two ranks, search + retrain, lockstep, files written once ------------------------------------
@pytest.mark.slow
def test_two_ranks_search_and_retrain_in_lockstep_and_write_each_file_once(tmp_path):
    overrides = [*TINY, "data.train_subset=60", "search.epochs=2", "train.epochs=1", "train.batch_size=128"]
    table, budget = hand_table(tmp_path, overrides)
    r0, r1 = launch(search_job_worker, 2, tmp_path, budget, table, overrides)

    # every rank held the same mu, multiplier and allocation after every epoch, and mu moved
    assert [h["epoch"] for h in r0["history"]] == [1, 2]
    for h0, h1 in zip(r0["history"], r1["history"]):
        assert h0["mu"] == h1["mu"] and h0["allocated"] == h1["allocated"] and h0["multiplier"] == h1["multiplier"]
        assert h0["weight_loss"] == h1["weight_loss"]  # the global loss, not each rank's shard's
    assert r0["history"][0]["mu"] != r0["history"][1]["mu"]
    assert r0["widths"] == r1["widths"] and r0["test_acc"] == r1["test_acc"]

    # only rank 0 wrote, and each output once
    run = (tmp_path / "run").resolve()
    assert r1["writes"] == []
    for name in ("arch.json", "model.pt", "search.png", "supernet_baked.pt", "recipe.toml"):
        assert r0["writes"].count(str(run / name)) == 1, name
    assert {p.name for p in run.iterdir()} == {
        ".lock",  # the run's lock (held by rank 0)
        "arch.json",
        "latency.json",
        "model.pt",
        "recipe.toml",
        "run.json",
        "search.jsonl",
        "search.png",
        "supernet_baked.pt",
    }
    lines = [json.loads(x) for x in (run / "search.jsonl").read_text().splitlines()]
    assert [x["mu"] for x in lines] == [h["mu"] for h in r0["history"]]
    assert json.loads((run / "run.json").read_text())["status"] == "done"


# -- done-when 2: 2 ranks with SyncBatchNorm == 1 rank on the same global batch ----------------------------------
STEP_SET = [*TINY_SET, "search.batch_size=64"]


@pytest.mark.parametrize("sync_bn", [True, False])
def test_one_step_on_two_ranks_equals_one_rank_with_synchronised_batchnorm(tmp_path, sync_bn):
    overrides = [*STEP_SET, f"distributed.sync_bn={str(sync_bn).lower()}"]
    one = one_search_step(overrides)
    r0, r1 = launch(one_step_worker, 2, tmp_path, overrides)
    stat_keys = [k for k in one if k.endswith(("running_mean", "running_var"))]
    for key in one:
        if sync_bn or key not in stat_keys:  # without sync, each rank's BN statistics are its shard's until broadcast
            assert torch.equal(r0[key], r1[key]), f"the ranks differ in {key}"  # lockstep, bit for bit
    mu_keys = [k for k in one if k.endswith(".mu")]
    assert mu_keys
    weights = [k for k in one if k.startswith("body.") and k.endswith(".weight")]
    worst = max(float((r0[k] - one[k]).abs().max()) for k in weights + mu_keys + ["losses"])
    stats = max(float((r0[k] - one[k]).abs().max()) for k in stat_keys)
    if sync_bn:  # the same function of the global batch, within float tolerance
        assert worst < 1e-5 and stats < 1e-5, (worst, stats)
    else:  # each rank normalises its own half: not the same step (why sync_bn exists)
        assert stats > 1e-4


# -- bad input: one message on rank 0, every rank stops, nothing hangs ---------------------------------------------
def _cli_on_two_ranks(tmp_path, args0, args1):
    return launch(cli_worker, 2, tmp_path, [args0, args1], timeout=120)


def _search_args(*extra):
    out = ["search", "--latency-ms", "1", "--device", "cpu", "--run-dir", "run", "--no-retrain"]
    for o in [*TINY_SET, *extra]:
        out += ["--set", o]
    return out


def test_a_batch_the_ranks_cannot_split_is_one_error_on_rank_0(tmp_path):
    args = _search_args("search.batch_size=127")
    (c0, _, e0), (c1, _, e1) = _cli_on_two_ranks(tmp_path, args, args)
    assert c0 == c1 == 2
    assert e0.count("error:") == 1 and "search.batch_size 127 does not split evenly over 2 ranks" in e0, e0
    assert e1 == ""
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_ranks_that_disagree_on_the_recipe_are_one_error_on_rank_0(tmp_path):
    (c0, _, e0), (c1, _, e1) = _cli_on_two_ranks(tmp_path, _search_args(), _search_args("search.lr=0.1"))
    assert c0 == c1 == 2
    assert e0.count("error:") == 1 and "the ranks disagree on the recipe: rank(s) 1" in e0, e0
    assert e1 == ""


# -- done-when 3: a killed rank stops the job; --resume under torchrun continues -----------------------------------
def _torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port"]
    cmd += [str(_port()), "-m", "flexslim", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _port() -> int:
    from dist_workers import free_port

    return free_port()


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (read from /proc), or None while it has not started."""
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != launcher.pid:
                continue
            env = (child / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(child.name)
    return None


# -- a checkpoint of one process resumes on two ranks -------------------------------------------------------------
class _StopBeforeSaving(Reporter):
    """Interrupts the search when epoch `at` is logged, i.e. after it ran but before it was checkpointed."""

    def __init__(self, at: int):
        self.at = at

    def log(self, line: str) -> None:
        if line.startswith(f"epoch {self.at:3d}/"):
            raise KeyboardInterrupt


def test_a_one_process_checkpoint_resumes_on_two_ranks_on_the_same_trajectory(tmp_path):
    overrides = [*TINY_SET, "search.epochs=2", "search.batch_size=128", "distributed.sync_bn=true"]
    whole = quickstart_search(overrides, None)  # one process, both epochs
    (tmp_path / "run").mkdir()
    with pytest.raises(KeyboardInterrupt):  # one process, killed during epoch 2: the checkpoint holds epoch 1
        quickstart_search(overrides, tmp_path / "run", reporter=_StopBeforeSaving(2))
    r0, r1 = launch(resume_search_worker, 2, tmp_path, overrides)
    assert r0 == r1 and r0["epochs"] == 2
    assert r0["allocated"] == whole.supernet.allocated()
    for stage, mu in whole.supernet.mean_widths().items():
        assert r0["mu"][stage] == pytest.approx(mu, abs=1e-3)
