"""flexslim.recipe.checks (every number, every output path) and flexslim.system.exits (exception -> exit code +
one line)."""

import math
import os

import pytest

from flexslim.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    BadInput,
    GateFailed,
    TimingFailed,
)
from flexslim.recipe import checks
from flexslim.system.exits import exit_code_for, exit_codes, outcome_for


def _message(fn, *args):
    with pytest.raises(BadInput) as err:
        fn(*args)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# -- numbers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0, "inf", "nan", "abc", "", True, None, [1]])
def test_budget_refuses_non_finite_non_positive_and_non_numbers(value):
    msg = _message(checks.budget_ms, value, checks.flag("--latency-ms"))
    assert msg.startswith("--latency-ms = ") and "pass a valid --latency-ms" in msg


@pytest.mark.parametrize("value, expected", [(0.5, 0.5), (3, 3.0), ("0.25", 0.25), (" 1e-3 ", 1e-3)])
def test_budget_accepts_and_converts(value, expected):
    assert checks.budget_ms(value, "--latency-ms") == expected


@pytest.mark.parametrize("value", [0, -5, 100.5, float("nan"), "p90"])
def test_percentile_is_in_0_100(value):
    _message(checks.percentile, value, "--percentile")


def test_percentile_bounds():
    assert checks.percentile(100, "p") == 100.0 and checks.percentile("0.1", "p") == 0.1


@pytest.mark.parametrize("value", [-1, 1.5, "two", checks.MAX_THREADS + 1])
def test_threads(value):
    _message(checks.threads, value, "--threads")


def test_threads_zero_is_the_runtime_default():
    assert (
        checks.threads(0, "--threads") == 0 and checks.threads("4", "--threads") == 4 and checks.threads(2.0, "t") == 2
    )


def test_caps_are_named():
    assert "4096" in _message(checks.batch, checks.MAX_BATCH + 1, "--batch")
    assert "100000" in _message(checks.runs, checks.MAX_RUNS + 1, "--runs")
    assert "10000" in _message(checks.warmup, checks.MAX_WARMUP + 1, "--warmup")
    assert "600" in _message(checks.min_seconds, 601, "--min-seconds")


def test_batch_bytes_cap_names_the_largest_batch_that_fits():
    msg = _message(checks.batch, 4096, checks.flag("--batch"), (3, 224, 224))
    assert "512 MiB" in msg and "(4096, 3, 224, 224)" in msg
    fit = int(msg.split("at most batch ")[1].split(" ")[0].rstrip(")"))
    assert checks.batch(fit, "b", (3, 224, 224)) == fit
    _message(checks.batch, fit + 1, "b", (3, 224, 224))
    assert checks.batch(4096, "b", (3, 32, 32)) == 4096  # CIFAR at the batch cap is 48 MiB


@pytest.mark.parametrize("value", [-0.1, 1.5, float("inf"), math.nan])
def test_fraction(value):
    _message(checks.fraction, value, "--min-accuracy")


def test_fraction_below_one():
    assert checks.fraction(1.0, "f") == 1.0
    _message(checks.fraction, 1.0, "m", True)


def test_origins_name_the_source_and_the_fix():
    msg = _message(checks.count, 0, checks.recipe_key("data.image_size", "r.toml"))
    assert msg.startswith("recipe key data.image_size (r.toml) = 0") and "--set data.image_size=" in msg
    msg = _message(checks.budget_ms, "inf", checks.metadata_key("flexslim.budget_ms", "--latency-ms"))
    assert "model metadata flexslim.budget_ms = 'inf'" in msg and "pass --latency-ms to override it" in msg


def test_long_values_are_shortened_and_stay_on_one_line():
    msg = _message(checks.budget_ms, "x\n" * 200, "--latency-ms")
    assert len(msg) < 200


def test_choice():
    assert checks.choice("cpu", "--provider", ("cpu", "cuda")) == "cpu"
    assert "cpu, cuda" in _message(checks.choice, "tpu", "--provider", ("cpu", "cuda"))


# -- output paths ----------------------------------------------------------------------------------------------
def test_output_path_ok(tmp_path):
    assert checks.check_output_path(tmp_path / "r.json", "--report") == tmp_path / "r.json"
    (tmp_path / "r.json").write_text("{}")
    assert checks.check_output_path(tmp_path / "r.json", "--report") == tmp_path / "r.json"


def test_output_path_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checks.check_output_path("r.json", "--report").name == "r.json"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_path_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "not writable" in _message(checks.check_output_path, ro / "r.json", "--report")
    finally:
        ro.chmod(0o700)


# -- exit codes -----------------------------------------------------------------------------------------------
def test_exit_codes_by_kind():
    assert exit_code_for(GateFailed("slow")) == EXIT_GATE == 1
    assert exit_code_for(BadInput("bad")) == EXIT_BAD_INPUT == 2
    assert exit_code_for(ZeroDivisionError()) == exit_code_for(TimingFailed("died")) == EXIT_INTERNAL == 3
    assert exit_code_for(MemoryError()) == EXIT_INTERNAL
    assert exit_code_for(KeyboardInterrupt()) == EXIT_INTERRUPTED


def _boom():
    raise ZeroDivisionError("division\nby zero")


def test_internal_error_is_one_line_naming_a_log_file(tmp_path):
    lines = []
    with pytest.raises(SystemExit) as err, exit_codes(lines.append, log_dir=tmp_path):
        _boom()
    assert err.value.code == 3
    (line,) = lines
    assert line.startswith("internal error") and "ZeroDivisionError: division by zero" in line and "--debug" in line
    (log,) = tmp_path.glob("crash-*.log")
    assert str(log) in line and "Traceback" in log.read_text() and "_boom" in log.read_text()


def test_debug_prints_the_traceback(tmp_path):
    lines = []
    with pytest.raises(SystemExit), exit_codes(lines.append, debug=True, log_dir=tmp_path):
        _boom()
    assert "Traceback" in lines[0] and lines[-1].startswith("internal error") and not list(tmp_path.iterdir())


@pytest.mark.parametrize("exc, code, start", [(BadInput("x"), 2, "error: x"), (GateFailed("y"), 1, "FAIL: y")])
def test_expected_errors_have_no_traceback(exc, code, start, tmp_path):
    lines = []
    with pytest.raises(SystemExit) as err, exit_codes(lines.append, log_dir=tmp_path):
        raise exc
    assert err.value.code == code and lines == [start] and not list(tmp_path.iterdir())


def test_exits_decided_by_the_cli_pass_through():
    import typer

    with pytest.raises(typer.Exit), exit_codes(print):
        raise typer.Exit(1)
    with pytest.raises(SystemExit) as err, exit_codes(print):
        raise SystemExit(0)
    assert err.value.code == 0


def test_unwritable_log_dir_still_gives_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = outcome_for(RuntimeError("x"), log_dir=blocker / "sub")
    assert out.code == 3 and out.log_path is None and "traceback not saved" in out.line
