"""flexslim.system.children: every process flexslim starts ends within seconds of its parent, whatever killed the
parent (SIGKILL here, which runs no cleanup at all).

Unit tests start a small intermediate parent (`python -c`) that starts children the way flexslim does (a
subprocess with `child_env` whose entry calls `adopt_from_env`, the isolated timing pool, a DataLoader), kill the
parent and poll /proc until its children are gone. The end-to-end tests (slow) kill a real `flexslim search`
during its latency stage (the real isolated timing helper measuring) and during its search epochs, a
`flexslim validate` while it times, and one rank of a 2-rank torchrun search; every descendant of the killed
process, listed from /proc before the kill, must be gone 5 s later, and a following `--resume` (or rerun) finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from search_fixtures import FAST_SET, TINY_SET, sets

import flexslim
from flexslim.system import children

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")

REPO = Path(flexslim.__file__).resolve().parents[1]


def _env() -> dict:
    """The children's environment, read now: it carries this test's own $FLEXSLIM_CACHE (conftest), so a search
    here times its networks instead of reading another test's (or the user's) latency cache."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "OMP_NUM_THREADS": "1",
    }


GONE_WITHIN = 5.0  # seconds after the parent's death
TIMEOUT = 90.0


# -- the process tree, from /proc --------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for child in _children(pid):
        out += [child, *_descendants(child)]
    return out


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/pid/stat after the command name (state first), or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has ended (its reaper may be slow)


def _cpu_ticks(pid: int) -> int:
    stat = _stat(pid)
    return int(stat[11]) + int(stat[12]) if stat else -1  # utime + stime


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _still_alive_after(pids: list[int], seconds: float = GONE_WITHIN) -> list[int]:
    """The processes of `pids` still alive after `seconds` (polled: returns as soon as all are gone)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT, log=None):
    """Poll `condition()` until it returns something true (returned); fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n" + "\n".join(log or []))
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(log or []))
        time.sleep(0.05)


def _busy(pid: int, ticks: int = 10) -> bool:
    """Whether `pid` uses the CPU (at least `ticks` clock ticks within a second): a helper that is measuring."""
    before, deadline = _cpu_ticks(pid), time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if _cpu_ticks(pid) - before >= ticks:
            return True
        time.sleep(0.02)
    return False


def _kill_and_check(pid: int, proc: subprocess.Popen | None = None) -> list[int]:
    """SIGKILL `pid` and return what it started (listed before the kill) that is still alive 5 s later."""
    started = _descendants(pid)
    os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=TIMEOUT)
    left = _still_alive_after(started)
    for p in left:  # not to leave them to the next test
        os.kill(p, signal.SIGKILL)
    return [(p, _cmdline(p)) for p in left] if left else []


def _parent(script: str, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "parent.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.Popen([sys.executable, str(path)], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, text=True)


def _line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line, f"the parent exited ({proc.wait()}) before saying what it started"
    return line.strip()


# -- unit: the helper ---------------------------------------------------------------------------------------------
CHILD = (
    "import os, sys, time; from flexslim.system.children import adopt_from_env, PARENT_ENV; adopt_from_env(); "
    "print('ready', PARENT_ENV in os.environ, flush=True); time.sleep(120)"
)


@pytest.mark.parametrize("from_thread", [False, True], ids=["main-thread", "short-lived-thread"])
def test_a_subprocess_child_dies_with_its_killed_parent(tmp_path, from_thread):
    # from a thread that ends at once: no parent-death signal (it would fire when that thread ends), the watchdog
    parent = _parent(
        f"""
        import subprocess, sys, threading, time
        from flexslim.system.children import child_env
        started = []
        def start():
            started.append(subprocess.Popen([sys.executable, "-c", {CHILD!r}], env=child_env()))
        if {from_thread}:
            t = threading.Thread(target=start); t.start(); t.join()
        else:
            start()
        print(started[0].pid, flush=True)
        time.sleep(120)
        """,
        tmp_path,
    )
    try:
        child = int(_line(parent))
        assert _line(parent) == "ready False"  # adopted; its own children do not inherit the variable
        assert _still_alive_after([child], 0.5) == [child]  # the starting thread's end does not kill it
        assert _kill_and_check(parent.pid, parent) == []
    finally:
        parent.kill()


def test_a_child_whose_parent_is_already_gone_exits_at_once(tmp_path):
    env = {**_env(), children.PARENT_ENV: "1:pdeathsig"}  # pid 1 is not its parent: the parent died before
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == children.ORPHANED_EXIT and proc.stdout == ""


def test_no_variable_no_watchdog(monkeypatch):
    monkeypatch.delenv(children.PARENT_ENV, raising=False)
    before = threading.active_count()
    children.adopt_from_env()
    assert threading.active_count() == before


def _relu_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("from_thread", [False, True], ids=["main-thread", "short-lived-thread"])
def test_the_isolated_timing_helper_stops_mid_measurement_when_its_parent_is_killed(tmp_path, from_thread):
    model = _relu_onnx(tmp_path / "relu.onnx")
    parent = _parent(
        f"""
        import threading, time
        from pathlib import Path
        from flexslim.latency import runtime
        def measure():  # 300 s of timed runs: still measuring when the parent dies
            model = Path({str(model)!r}).read_bytes()
            plan = runtime.TimingPlan(batch=8, warmup=1, runs=10, percentile=90.0, threads=1, seed=0, min_seconds=300.0)
            runtime.isolated_pool().submit(runtime.time_model_bytes, model, "cpu", plan)
        if __name__ == "__main__":  # the spawned helper imports this file
            if {from_thread}:
                t = threading.Thread(target=measure); t.start(); t.join()
            else:
                measure()
            print("submitted", flush=True)
            time.sleep(120)
        """,
        tmp_path,
    )
    try:
        assert _line(parent) == "submitted"
        helper = _wait_for(
            lambda: [p for p in _descendants(parent.pid) if "multiprocessing.spawn" in _cmdline(p)],
            "the helper",
            parent,
        )[0]
        _wait_for(lambda: _busy(helper), "the helper to measure", parent)
        assert _kill_and_check(parent.pid, parent) == []  # the helper and spawn's resource tracker
    finally:
        parent.kill()


def test_dataloader_workers_die_mid_batch_with_their_killed_owner(tmp_path):
    parent = _parent(
        """
        import time, torch
        from flexslim.data.tensors import worker_init
        class Slow(torch.utils.data.Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, i):
                time.sleep(300)  # torch's own watchdog looks at the parent only between items
                return i
        loader = torch.utils.data.DataLoader(Slow(), batch_size=1, num_workers=2, worker_init_fn=worker_init())
        batches = iter(loader)
        print("started", flush=True)
        next(batches)
        """,
        tmp_path,
    )
    try:
        assert _line(parent) == "started"
        _wait_for(lambda: len(_descendants(parent.pid)) >= 2, "two workers", parent)
        assert _kill_and_check(parent.pid, parent) == []
    finally:
        parent.kill()


# -- end to end: a killed flexslim leaves nothing behind ---------------------------------------------------------
SEARCH_SET = sets(*TINY_SET, *FAST_SET, "search.epochs=3", "search.trim=false")  # the bake: first choice only


class _Job:
    """`python -m flexslim ARGS` with its stderr collected by a thread (so /proc can be polled meanwhile)."""

    def __init__(self, args: list[str], cwd: Path, cmd: list[str] | None = None, env: dict | None = None):
        cmd = cmd or [sys.executable, "-m", "flexslim"]
        self.proc = subprocess.Popen(
            [*cmd, *args], cwd=cwd, env=env or _env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        threading.Thread(
            target=lambda: self.lines.extend(x.rstrip("\n") for x in self.proc.stderr), daemon=True
        ).start()

    def saw(self, prefix: str) -> bool:
        return any(x.startswith(prefix) for x in self.lines)

    def helper(self) -> int | None:
        found = [p for p in _descendants(self.proc.pid) if "multiprocessing.spawn" in _cmdline(p)]
        return found[0] if found else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _search_args(budget: str = "0.2") -> list[str]:
    return ["search", "--latency-ms", budget, "--device", "cpu", "--run-dir", "R", "--no-retrain", *SEARCH_SET]


def _resume_finishes(cwd: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flexslim", *_search_args(), "--resume"],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((cwd / "R" / "run.json").read_text())["status"] == "searched"


@pytest.mark.slow
def test_a_search_killed_in_its_latency_stage_then_in_its_epochs_leaves_nothing_and_resumes(tmp_path):
    """One run killed twice: while its helper measures the latency model, then (resumed) during its epochs."""
    with _Job(_search_args(), tmp_path) as job:
        helper = _wait_for(job.helper, "the timing helper", job.proc, log=job.lines)
        _wait_for(lambda: _busy(helper), "the helper to measure", job.proc, log=job.lines)
        assert not job.saw("latency model:"), "the latency stage ended before the kill"
        assert _kill_and_check(job.proc.pid, job.proc) == []
    with _Job([*_search_args(), "--resume"], tmp_path) as job:
        _wait_for(lambda: job.saw("epoch   1/3"), "epoch 1", job.proc, log=job.lines)
        assert job.helper() is not None  # the helper lives on (idle) after the latency stage
        assert not job.saw("epoch   3/3")
        assert _kill_and_check(job.proc.pid, job.proc) == []
    _resume_finishes(tmp_path)
    assert (tmp_path / "R" / "arch.json").is_file()


@pytest.mark.slow
def test_a_validate_killed_while_timing_leaves_nothing_and_reruns(tmp_path, exported):
    args = ["validate", str(exported.path), "--latency-ms", "5", "--threads", "1", "--batch", "8"]
    with _Job([*args, "--min-seconds", "60"], tmp_path) as job:
        loaded = lambda: "onnxruntime" in Path(f"/proc/{job.proc.pid}/maps").read_text()  # noqa: E731
        _wait_for(loaded, "onnxruntime to load", job.proc, log=job.lines)
        _wait_for(lambda: _busy(job.proc.pid), "the timing", job.proc, log=job.lines)
        assert _kill_and_check(job.proc.pid, job.proc) == []
    rerun = subprocess.run(
        [sys.executable, "-m", "flexslim", *args, "--min-seconds", "0.5", "--report", "r.json"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert rerun.returncode in (0, 1), rerun.stderr
    assert json.loads((tmp_path / "r.json").read_text())["latency_ms"] > 0


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank, or None while it has not started."""
    for pid in _children(launcher):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            pass
    return None


@pytest.mark.slow
def test_a_torchrun_search_with_a_killed_rank_stops_says_so_leaves_nothing_and_resumes(tmp_path):
    """Rank 1 killed: rank 0 (the store's host, with the timing helper) says so and exits, nothing is left."""
    from dist_workers import free_port

    from flexslim.system import distributed

    env = {**_env(), distributed.TIMEOUT_ENV: "60"}  # a rank waiting longer than this in a collective is a failure
    epochs = 4
    args = [*_search_args(), "--set", f"search.epochs={epochs}", "--set", "distributed.sync_bn=true"]
    jsonl = tmp_path / "R" / "search.jsonl"

    def torchrun() -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m", "flexslim"]  # fmt: skip

    with _Job(args, tmp_path, torchrun(), env) as job:
        rank0 = _wait_for(lambda: _rank_pid(job.proc.pid, 0), "rank 0", job.proc, log=job.lines)
        _wait_for(
            lambda: (tmp_path / "R" / "search_state.pt").is_file(), "an epoch checkpoint", job.proc, log=job.lines
        )
        assert any("multiprocessing.spawn" in _cmdline(p) for p in _descendants(rank0)), "rank 0 has no helper"
        started = _descendants(job.proc.pid)  # both ranks, rank 0's helper and its resource tracker
        os.kill(_rank_pid(job.proc.pid, 1), signal.SIGKILL)
        assert job.proc.wait(timeout=TIMEOUT) != 0  # no hang: torchrun stops the other rank and exits
        left = _still_alive_after(started)
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert left == [], [(p, _cmdline(p)) for p in left]
    time.sleep(0.2)  # the stderr thread reads what the job printed last
    said = "\n".join(job.lines)
    assert "error: rank 0 of 2: the distributed job stopped" in said, said
    assert "rerun the same torchrun command with --resume" in said
    done_before = jsonl.read_text().count("\n")
    assert 1 <= done_before < epochs
    resumed = subprocess.run(
        [*torchrun(), *args, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming search after epoch" in resumed.stdout + resumed.stderr
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, epochs + 1))
    assert (tmp_path / "R" / "arch.json").is_file()
    assert json.loads((tmp_path / "R" / "run.json").read_text())["status"] == "searched"
