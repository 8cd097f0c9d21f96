"""The headroom's measured floor (#23 item 4): how far re-timings of one network moved on this device, recorded by
the bake's confirmations and the export gate, read back as the floor of the next bake's headroom."""

from __future__ import annotations

import math

import pytest
from search_fixtures import FAST_LATENCY, small_arch

from flexslim.latency import rechecks
from flexslim.latency.budget import MIN_HEADROOM, WINDOW, Budget
from flexslim.latency.runtime import Timing

DEVICE = "0123456789abcdef"


def test_the_floor_is_the_prior_until_three_re_timings_then_the_p90_of_how_far_they_moved(flexslim_cache):
    assert rechecks.floor(DEVICE) == rechecks.Floor(MIN_HEADROOM)
    assert rechecks.record(DEVICE, 1.00, 1.01, "bake") and rechecks.record(DEVICE, 2.0, 1.96, "gate")
    assert rechecks.floor(DEVICE).pairs == 0  # two pairs: still the prior
    assert rechecks.record(DEVICE, 1.00, 1.015, "bake")
    f = rechecks.floor(DEVICE)
    assert (f.pairs, f.value, f.worst) == (3, pytest.approx(0.02), pytest.approx(0.02)) and f.value < MIN_HEADROOM
    assert "3 re-timings" in f.describe() and "prior" in rechecks.Floor(MIN_HEADROOM).describe()
    # a torn or corrupt line says nothing; figures that are not positive numbers, an unknown source or an id that is
    # not a fingerprint's are not recorded; another device's pairs are its own
    path = flexslim_cache / "latency" / f"{DEVICE}.rechecks.jsonl"
    with path.open("ab") as fh:
        fh.write(b'{"earlier_ms": 1.0, "fresh_ms": \n not json\n')
    for bad in ((0.0, 1.0, "bake"), (1.0, math.nan, "bake"), (1.0, -1.0, "gate"), (1.0, 1.5, "elsewhere")):
        assert not rechecks.record(DEVICE, *bad)
    assert not rechecks.record("../../etc", 1.0, 1.5, "bake")
    assert rechecks.moves(DEVICE) == pytest.approx([0.01, 0.02, 0.015])
    assert rechecks.floor("fedcba9876543210").pairs == 0
    # the newest RECHECKS pairs decide: a device that became quiet gets a small floor back
    for _ in range(rechecks.RECHECKS):
        rechecks.record(DEVICE, 1.0, 1.004, "bake")
    assert rechecks.floor(DEVICE).value == pytest.approx(0.004) and rechecks.floor(DEVICE).pairs == rechecks.RECHECKS


def test_the_file_stays_bounded_and_the_cache_switched_off_neither_reads_nor_writes_it(flexslim_cache, monkeypatch):
    from flexslim.latency.cache import clear

    monkeypatch.setattr(rechecks, "KEEP_PAIRS", 5)
    for i in range(8):
        assert rechecks.record(DEVICE, 1.0, 1.0 + i / 100, "bake")
    path = flexslim_cache / "latency" / f"{DEVICE}.rechecks.jsonl"
    assert len(path.read_bytes().splitlines()) == 5
    monkeypatch.setenv("FLEXSLIM_NO_CACHE", "1")
    assert not rechecks.record(DEVICE, 1.0, 1.5, "bake") and rechecks.floor(DEVICE).pairs == 0
    monkeypatch.delenv("FLEXSLIM_NO_CACHE")
    assert path in clear() and not path.exists()  # `flexslim cache clear` removes it with the entries


def test_the_budget_takes_the_measured_floor_instead_of_the_fixed_one_within_half_the_window():
    assert Budget.for_noise(1.0, 0.0, 2.0).headroom == MIN_HEADROOM
    assert Budget.for_noise(1.0, 0.0, 2.0, floor=0.01).headroom == pytest.approx(0.01)
    assert Budget.for_noise(1.0, 0.01, 2.0, floor=0.01).headroom == pytest.approx(0.02)  # the spread, when larger
    assert Budget.for_noise(1.0, 0.0, 2.0, floor=0.2).headroom == pytest.approx(WINDOW / 2)
    assert Budget(1.0, 0.0).refit(0.0, 2.0, floor=0.012).headroom == pytest.approx(0.012)


def _bake_on_this_device(monkeypatch, timings: dict):
    """bake() from 16/8/16 at budget 1.0 with the real measuring function replaced by a clock of known figures
    (successive timings of a network in `timings` popped from its list; sessions 1% apart), as the device's own."""
    from flexslim.search import bake as bake_mod

    model = {(16, 8, 16): 0.80, (16, 16, 16): 0.93, (8, 8, 16): 0.70}

    class Model:
        def predict(self, w):
            return model.get((w["a"], w["b"], w["c"]), 9.9)

    def measure(arch, widths, settings):
        key = (widths["a"], widths["b"], widths["c"])
        ms = timings[key].pop(0) if timings.get(key) else model.get(key, 9.9)
        return Timing("cpu", 8, (8, 1, 16, 16), 1, 2, 10, 90.0, 0.9 * ms, ms, ms, ms, "fake",
                      sessions=(0.99 * ms, ms, 1.01 * ms))  # fmt: skip

    monkeypatch.setattr(bake_mod, "measure", measure)  # the bake's measuring function: this device's timings
    plan = bake_mod.BakePlan(FAST_LATENCY, 8, 8, screen_out=None, confirm=True, confidence=2.0)
    return bake_mod.bake(small_arch(), {"a": 16.0, "b": 8.0, "c": 16.0}, budget=Budget(1.0, headroom=0.02),
                         latency=Model(), plan=plan, measure=measure)  # fmt: skip


def test_the_bake_keeps_the_headroom_this_devices_re_timings_measured_and_records_its_confirmation(monkeypatch):
    """16/16/16 measures 0.93 (0.930 x): under the prior's limit (2 x 1% spread, at least 3%: 0.97) it is kept,
    and its confirming timing (0.95) is recorded as a re-timing of this device. With re-timings on record that moved
    4% the floor is 4%: the limit 0.96; with ones that moved 8%, the cap (half the window: 0.95)."""
    device = rechecks.device_of(FAST_LATENCY)
    res = _bake_on_this_device(monkeypatch, {(16, 16, 16): [0.93, 0.95]})
    assert res.budget.headroom == pytest.approx(MIN_HEADROOM) and res.floor["pairs"] == 0
    assert res.widths == {"a": 16, "b": 16, "c": 16} and res.measured_ms == 0.95
    assert rechecks.moves(device) == pytest.approx([0.95 / 0.93 - 1])  # the confirmation, recorded
    for move in (0.04, 0.04, 0.04):
        rechecks.record(device, 1.0, 1.0 + move, "gate")
    res = _bake_on_this_device(monkeypatch, {(16, 16, 16): [0.93, 0.95]})
    assert res.budget.headroom == pytest.approx(0.04) and res.floor["pairs"] == 4
    for _ in range(rechecks.RECHECKS):
        rechecks.record(device, 1.0, 1.08, "gate")
    res = _bake_on_this_device(monkeypatch, {(16, 16, 16): [0.93, 0.95]})
    assert res.budget.headroom == pytest.approx(WINDOW / 2) and res.floor["value"] == pytest.approx(0.08)
    assert res.budget.limit_ms == pytest.approx(0.95)


def test_the_export_gate_records_its_reading_against_the_baked_figure_only_on_the_device_that_baked(tmp_path):
    from dataclasses import replace
    from types import SimpleNamespace

    from flexslim.jobs.export import _record_recheck
    from flexslim.system.runs import RunRecord

    record = RunRecord(tmp_path / "run")
    record.update(measuring_device={"id": DEVICE}, measured_ms=0.050)
    full = Timing("cpu", 32, (32, 1, 16, 16), 1, 10, 50, 90.0, 0.05, 0.052, 0.052, 0.05, "onnxruntime")
    _record_recheck(SimpleNamespace(device="fedcba9876543210", timing=full), record)  # measured elsewhere
    _record_recheck(SimpleNamespace(device=DEVICE, timing=replace(full, stopped="over_budget")), record)  # cut short
    assert rechecks.moves(DEVICE) == []
    _record_recheck(SimpleNamespace(device=DEVICE, timing=full), record)
    assert rechecks.moves(DEVICE) == pytest.approx([0.04])
