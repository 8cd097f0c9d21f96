"""kill -9 a search at three points (the latency model's near-budget measurements, mid-epoch of a resumed run, the
bake), resume it, and get the same arch.json and final mu as an uninterrupted run on the same latency table;
SIGTERM leaves a resumable run (exit 143, one line).

The searches run in subprocesses through tests/fake_timing_cli.py: `python -m flexslim` with a deterministic
timer (a function of the ONNX model's size that sleeps FAKE_TIMING_SLEEP per call), so a measurement repeated
after the kill gives the same number and the comparison can be exact. One test times for real (`python -m
flexslim`, tiny settings): killed in the search epochs and resumed with --latency-table, it must measure nothing
again (latency.json byte for byte) and continue the trajectory it had.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from search_fixtures import FAST_SET, TINY_SET, sets

HARNESS = str(Path(__file__).with_name("fake_timing_cli.py"))
EPOCHS = 3
COMMON = sets(*TINY_SET, *FAST_SET, "latency.near=3", f"search.epochs={EPOCHS}")
BUDGET = "0.08"  # ms of the fake timer: binding (the search grows the tiny net, the bake trims)
SEARCH = ["search", "--latency-ms", BUDGET, "--latency-table", "t.json", "--no-retrain", *COMMON]
TIMEOUT = 120

pytestmark = pytest.mark.slow


def _env(sleep: float) -> dict:
    return {**os.environ, "FAKE_TIMING_SLEEP": str(sleep), "OMP_NUM_THREADS": "1"}


def _run(cwd: Path, args: list[str], sleep: float = 0.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, HARNESS, *args], cwd=cwd, env=_env(sleep), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}"
    return proc


def _interrupt(cwd: Path, trigger, sig: int, sleep: float = 0.5, argv: list[str] | None = None) -> tuple[int, str]:
    """Start the search (`argv`: the whole command, default the fake-timer one), send `sig` when
    `trigger(line, seen_lines)` is true for a stderr line; (exit, stderr)."""
    proc = subprocess.Popen(
        argv or [sys.executable, HARNESS, *SEARCH],
        cwd=cwd,
        env=_env(sleep),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    sent = False
    try:
        deadline = time.monotonic() + TIMEOUT
        for line in proc.stderr:
            seen.append(line.rstrip("\n"))
            if not sent and trigger(seen[-1], seen):
                os.kill(proc.pid, sig)
                sent = True
                if sig == signal.SIGKILL:
                    break
            assert time.monotonic() < deadline, "the search ran past the timeout"
        rest = proc.stderr.read() if not proc.stderr.closed else ""
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:  # helper processes left by a kill -9 (the timing pool); this test started them
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert sent, "the trigger never fired:\n" + "\n".join(seen)
    return code, "\n".join(seen) + (rest or "")


def _outcome(cwd: Path) -> dict:
    run = (cwd / "runs" / "latest").resolve()
    lines = [json.loads(x) for x in (run / "search.jsonl").read_text().splitlines()]
    keep = ("epoch", "mu", "mu_avg", "allocated", "multiplier", "final_widths")
    return {
        "arch": (run / "arch.json").read_text(),
        "mu": lines[-1]["mu"],
        "history": [{k: line.get(k) for k in keep} for line in lines],
        "status": json.loads((run / "run.json").read_text())["status"],
        "state_left": (run / "search_state.pt").exists(),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The latency table (profiled with the fake timer) and the uninterrupted search on it."""
    root = tmp_path_factory.mktemp("kill-ref")
    _run(root, ["profile", "--out", "t.json", *COMMON])
    _run(root, SEARCH)
    return root, _outcome(root)


def _fresh(tmp_path: Path, reference) -> Path:
    (tmp_path / "t.json").write_bytes((reference[0] / "t.json").read_bytes())
    return tmp_path


def _resume_and_compare(cwd: Path, reference) -> None:
    proc = _run(cwd, [*SEARCH, "--resume"])
    got = _outcome(cwd)
    want = reference[1]
    assert got["status"] == "searched" and not got["state_left"]
    assert got["arch"] == want["arch"]
    assert got["mu"] == want["mu"]  # exactly: the resumed trajectory is the uninterrupted one
    assert got["history"] == want["history"]
    return proc


def test_kill_during_the_latency_model(tmp_path, reference):
    cwd = _fresh(tmp_path, reference)
    code, log = _interrupt(cwd, lambda line, seen: line == "fake timing 2", signal.SIGKILL)
    assert code == -signal.SIGKILL and "latency model:" not in log and "epoch" not in log
    _resume_and_compare(cwd, reference)


def test_kill_during_the_bake(tmp_path, reference):
    cwd = _fresh(tmp_path, reference)
    code, log = _interrupt(cwd, lambda line, seen: line.startswith("bake choose"), signal.SIGKILL)
    assert code == -signal.SIGKILL and "searched widths" not in log
    proc = _resume_and_compare(cwd, reference)
    assert f"resuming search after epoch {EPOCHS}/{EPOCHS}" in proc.stderr


def test_sigterm_leaves_a_resumable_run_and_a_kill_mid_epoch_of_the_resumed_one_resumes_too(tmp_path, reference):
    """SIGTERM at epoch 1: exit 143, one line, a resumable run. Its resume killed -9 at epoch 2 (mid-run, with the
    state of a resumed run on disk) resumes again and ends on the uninterrupted trajectory (one test: it was two
    that each ran a search from the start)."""
    cwd = _fresh(tmp_path, reference)
    code, log = _interrupt(cwd, lambda line, seen: line.startswith(f"epoch   1/{EPOCHS}"), signal.SIGTERM)
    assert code == 143, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM)") and "--resume" in last and "Traceback" not in log
    run = (cwd / "runs" / "latest").resolve()
    assert (run / "search_state.pt").is_file() and not list(run.glob(".*.tmp"))
    resumed = [sys.executable, HARNESS, *SEARCH, "--resume"]
    code, log = _interrupt(cwd, lambda line, seen: line.startswith(f"epoch   2/{EPOCHS}"), signal.SIGKILL, argv=resumed)
    assert code == -signal.SIGKILL and f"resuming search after epoch 1/{EPOCHS}" in log
    assert f"epoch   3/{EPOCHS}" not in log
    proc = _resume_and_compare(cwd, reference)
    assert f"resuming search after epoch 2/{EPOCHS}" in proc.stderr


# -- real timings: a resumed run reads its own latency model, never the table again ----------------------------------
REAL_EPOCHS = 4
# stage3 at 32 (TINY_SET's 16): a box of 2 x 4 x 8 grid networks, which the profile's 7 never cover (in the
# 2 x 4 x 4 box of TINY_SET its samples, min_width included, could leave nothing unmeasured near any budget)
WIDER_STAGES = TINY_SET[1].replace('"stage3", width = 16', '"stage3", width = 32')
REAL = sets(
    TINY_SET[0], WIDER_STAGES, *FAST_SET, "latency.near=2", f"search.epochs={REAL_EPOCHS}", "search.trim=false"
)


def _flexslim(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "flexslim", *args], cwd=cwd, env=_env(0.0), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr}"
    return proc


def _refined_budget(table: Path) -> tuple[str, int]:
    """A budget the run must refine the table at (the measuring the bug repeated on resume) -> (budget, latency.near
    for the search): above the floor (a fit of noisy timings can predict networks under the narrowest one's
    measurement), with unmeasured grid networks predicted near it, and `near` one more than the fit points near it."""
    import itertools

    from flexslim.latency.model import NEAR, LatencyModel

    model = LatencyModel.load(table)
    measured = [p.widths for p in model.fit_points + model.holdout_points]
    grids = [range(lo, hi + 1, 8) for lo, hi in model.region.values()]
    nets = [dict(zip(model.region, w)) for w in itertools.product(*grids)]
    preds = {tuple(w.values()): float(model.predict(w)) for w in nets if w not in measured}
    above = [b for b in preds.values() if b > 1.1 * model.floor_ms]
    for b in sorted(above, key=lambda b: len(model.near(b))):
        if sum(abs(p / b - 1) <= NEAR for p in preds.values()) >= 2:
            return f"{b:.6f}", len(model.near(b)) + 1
    pytest.skip("no unmeasured grid networks near any budget of this table (its samples covered the small region, "
                "min_width included): the bug cannot show")


def test_real_timings_killed_in_the_search_resume_without_measuring_again(tmp_path):
    """profile -> search --latency-table (real onnxruntime timings), kill -9 after epoch 2, the same command with
    --resume: exit 0, latency.json unchanged byte for byte (the table was not reloaded, nothing re-measured), the
    epochs before the kill are the same lines, the search goes on from epoch 2. A later resume with another table
    says so in one note line and still reads nothing of it."""
    _flexslim(tmp_path, ["profile", "--out", "t.json", *REAL])
    budget, near = _refined_budget(tmp_path / "t.json")
    refining = [f"latency.near={near}" if a == "latency.near=2" else a for a in REAL]
    search = ["search", "--latency-ms", budget, "--latency-table", "t.json", "--no-retrain", "--run-dir", "R"]
    search += refining
    code, log = _interrupt(
        tmp_path,
        lambda line, seen: line.startswith(f"epoch   2/{REAL_EPOCHS}"),
        signal.SIGKILL,
        argv=[sys.executable, "-m", "flexslim", *search],
    )
    assert code == -signal.SIGKILL and "searched widths" not in log, log
    run = tmp_path / "R"
    latency_json = (run / "latency.json").read_bytes()
    before = [json.loads(x) for x in (run / "search.jsonl").read_text().splitlines()]
    assert len(before) >= 2 and (run / "search_state.pt").is_file()
    table_points = len(json.loads((tmp_path / "t.json").read_text())["fit_points"])
    if len(json.loads(latency_json)["fit_points"]) <= table_points:  # real timings of a tiny space: noise decides
        pytest.skip("the run found nothing to refine near this budget (timing noise): the bug cannot show")
    assert json.loads((run / "run.json").read_text())["latency_table"]["path"] == str(tmp_path / "t.json")

    proc = _flexslim(tmp_path, [*search, "--resume"])
    assert f"resuming search after epoch {len(before)}/{REAL_EPOCHS}" in proc.stderr, proc.stderr
    assert "note:" not in proc.stderr and "measuring" not in proc.stderr
    assert (run / "latency.json").read_bytes() == latency_json  # the run's own model, not re-measured or refit
    after = [json.loads(x) for x in (run / "search.jsonl").read_text().splitlines()]
    assert after[: len(before)] == before and [h["epoch"] for h in after] == list(range(1, REAL_EPOCHS + 1))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "searched" and not (run / "search_state.pt").exists()

    other = json.loads((tmp_path / "t.json").read_text())
    other["floor_ms"] *= 1.5  # a valid table, not the one the run started with
    (tmp_path / "t2.json").write_text(json.dumps(other))
    again = [*search, "--resume"]
    again[again.index("t.json")] = "t2.json"
    proc = _flexslim(tmp_path, again)
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "t2.json" in notes[0] and "t.json" in notes[0], proc.stderr
    assert (run / "latency.json").read_bytes() == latency_json
