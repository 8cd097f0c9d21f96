"""The README-job benchmark (`python -m flexslim.bench.mainjob`): what it reads from the commands' output and how it
prints a run (the benchmark itself runs the whole job, minutes: it is run by hand, not here)."""

import pytest

from flexslim.bench import mainjob


@pytest.mark.parametrize(
    "line, verdict, ms",
    [
        ("PASS latency: p90 0.0591 ms/sample <= budget 0.06 ms (cpu, batch 32)", "PASS", 0.0591),
        ("FAIL latency: p90 0.0630 ms/sample > budget 0.06 ms (cpu, batch 32)", "FAIL", 0.0630),
        ("PASS latency: p99.5 1.25 ms/sample <= budget 2 ms (cuda, batch 8)", "PASS", 1.25),
    ],
)
def test_the_gate_line_of_export_is_read(line, verdict, ms):
    m = mainjob._GATE.search(f"some table\n{line}\nnote: ...")
    assert m and m.group(1) == verdict and float(m.group(2)) == ms


def test_a_run_prints_on_one_line_with_missing_figures_as_dashes():
    row = dict.fromkeys(["holdout_near_median_pct", "holdout_near_max_pct", "export_gate_ratio"])
    row.update(wall_s=81.1, latency_model_s=27.0, bake_s=15.1, search_s=12.0, retrain_s=6.0, other_s=7.4,
               export_s=13.6, export_exit=0, cache="3/35 + bake 0/5", holdout_median_pct=2.1, holdout_max_pct=6.5,
               widths={"stage1": 16}, bake_ratio=0.882)  # fmt: skip
    text = mainjob._show("cold", row)
    assert "\n" not in text and text.startswith("cold: 81.1 s = latency model 27.0 + bake 15.1")
    assert "near the budget median -% max -%" in text and "export gate - x budget" in text


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as end:
        mainjob.main(["--help"])
    assert end.value.code == 0 and "--no-warm" in capsys.readouterr().out
