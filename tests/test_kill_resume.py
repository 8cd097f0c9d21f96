"""kill -9 a search at three points (the latency model's near-budget measurements, mid-epoch, the bake), resume
it, and get the same arch.json and final mu as an uninterrupted run on the same latency table; SIGTERM leaves a
resumable run (exit 143, one line).

The searches run in subprocesses through tests/fake_timing_cli.py: `python -m flexslim` with a deterministic
timer (a function of the ONNX model's size that sleeps FAKE_TIMING_SLEEP per call), so a measurement repeated
after the kill gives the same number and the comparison can be exact.
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


def _interrupt(cwd: Path, trigger, sig: int, sleep: float = 0.5) -> tuple[int, str]:
    """Start the search, send `sig` when `trigger(line, seen_lines)` is true for a stderr line; (exit, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, HARNESS, *SEARCH],
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


def test_kill_mid_epoch(tmp_path, reference):
    cwd = _fresh(tmp_path, reference)
    code, log = _interrupt(cwd, lambda line, seen: line.startswith(f"epoch   1/{EPOCHS}"), signal.SIGKILL)
    assert code == -signal.SIGKILL and f"epoch   2/{EPOCHS}" not in log
    proc = _resume_and_compare(cwd, reference)
    assert f"resuming search after epoch 1/{EPOCHS}" in proc.stderr


def test_kill_during_the_bake(tmp_path, reference):
    cwd = _fresh(tmp_path, reference)
    code, log = _interrupt(cwd, lambda line, seen: line.startswith("bake choose"), signal.SIGKILL)
    assert code == -signal.SIGKILL and "searched widths" not in log
    proc = _resume_and_compare(cwd, reference)
    assert f"resuming search after epoch {EPOCHS}/{EPOCHS}" in proc.stderr


def test_sigterm_leaves_a_resumable_run(tmp_path, reference):
    cwd = _fresh(tmp_path, reference)
    code, log = _interrupt(cwd, lambda line, seen: line.startswith(f"epoch   1/{EPOCHS}"), signal.SIGTERM)
    assert code == 143, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM)") and "--resume" in last and "Traceback" not in log
    run = (cwd / "runs" / "latest").resolve()
    assert (run / "search_state.pt").is_file() and not list(run.glob(".*.tmp"))
    _resume_and_compare(cwd, reference)
