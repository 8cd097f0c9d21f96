"""`python -m flexslim.bench.stopping`: a real file timed both ways in the isolated helper, interleaved."""

from __future__ import annotations

import pytest

from flexslim.bench import stopping


def test_the_stopping_bench_times_both_ways_and_prints_their_ratio(exported, capsys):
    res = stopping.compare(exported.path, rounds=2, tolerance=0.5, seconds=0.2, repeats=1, batch=4, threads=1)
    assert [len(res[w]) for w in ("full", "stopping")] == [2, 2]
    assert all(ms > 0 and s > 0 for rows in res.values() for ms, s in rows)
    full_s = min(s for _, s in res["full"])
    assert full_s >= 0.2  # timed in full: at least its seconds
    assert stopping.main([str(exported.path), "--rounds", "1", "--seconds", "0.1", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("full") and lines[1].startswith("stopping")
    assert float(lines[-1].split(":")[1]) == pytest.approx(1.0, abs=0.5)
