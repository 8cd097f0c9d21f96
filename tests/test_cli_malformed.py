"""The CLI-level table of malformed inputs: flags, recipes (--set), ONNX files (tampered metadata included), state
files, run directories and output paths. Every case must exit 2 (never 0 or 1: CI reads 1 as a slow model) with a
single `error:` line on stderr, no traceback, no run directory left behind and `runs/latest` unmoved. One internal
error exits 3 and names the log file holding its traceback."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from search_fixtures import TINY_SET
from test_malformed_inputs import METADATA_CASES, RECIPE_CASES, _with_metadata
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.models.arch import arch_json
from flexslim.recipe.schema import load_recipe, recipe_to_toml
from flexslim.system.runs import mark_latest
from flexslim.train.checkpoint import train_identity

FAST = ["--runs", "2", "--warmup", "0", "--min-seconds", "0"]


class World:
    """The files the cases point at, made lazily in the case's own temporary folder (the working directory)."""

    def __init__(self, root: Path, make_onnx, tiny_arch):
        self.root, self._make_onnx, self._arch = root, make_onnx, tiny_arch
        (root / "a-file").write_text("x")
        (root / "a-dir").mkdir()

    def onnx(self, **meta: str) -> str:
        src = self._make_onnx("plain.onnx")
        return str(_with_metadata(src, self.root / "tampered.onnx", **meta)) if meta else str(src)

    def raw(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return name

    def run(self, *, state: object | None = None, run_json: str | None = None, recipe=None) -> str:
        """runs/r1 (pointed at by runs/latest): arch.json, recipe.toml, optional run.json / train_state.pt."""
        d = self.root / "runs" / "r1"
        d.mkdir(parents=True, exist_ok=True)
        (d / "arch.json").write_text(arch_json(self._arch))
        (d / "recipe.toml").write_text(recipe_to_toml(recipe or load_recipe("quickstart", TINY_SET)))
        if run_json is not None:
            (d / "run.json").write_text(run_json)
        if isinstance(state, bytes):
            (d / "train_state.pt").write_bytes(state)
        elif state is not None:
            torch.save(state, d / "train_state.pt")
        mark_latest(d)
        return str(d)


def _train_state(epochs: int) -> dict:
    ident = train_identity(load_recipe("quickstart", TINY_SET), epochs)
    return {"identity": ident, "model": {}, "optimizer": {}, "step": 0, "history": []}


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# (id, argv builder, text the line must contain)
CASES: list[tuple[str, object, str]] = []


def case(name: str, needle: str = ""):
    def add(build):
        CASES.append((name, build, needle))
        return build

    return add


# -- validate flags ---------------------------------------------------------------------------------------------
for flag_name, value in [
    ("--latency-ms", "inf"),
    ("--latency-ms", "nan"),
    ("--latency-ms", "-1"),
    ("--latency-ms", "0"),
    ("--latency-ms", "fast"),
    ("--threads", "-1"),
    ("--threads", "100000"),
    ("--batch", "0"),
    ("--batch", "10000000"),
    ("--batch", "x"),
    ("--percentile", "0"),
    ("--percentile", "101"),
    ("--percentile", "nan"),
    ("--min-accuracy", "-0.1"),
    ("--min-accuracy", "1.5"),
    ("--runs", "0"),
    ("--runs", "1000000000"),
    ("--warmup", "-1"),
    ("--min-seconds", "inf"),
    ("--min-seconds", "-1"),
    ("--provider", "tpu"),
    ("--dataset", "emnist"),
]:
    case(f"validate {flag_name}={value}", flag_name)(
        lambda w, f=flag_name, v=value: ["validate", w.onnx(), *FAST, f"{f}={v}"]
    )
case("validate unknown flag", "--nosuch")(lambda w: ["validate", w.onnx(), "--nosuch"])
case("validate no model", "model")(lambda w: ["validate"])
case("no such command", "nosuch")(lambda w: ["nosuch"])

# -- validate output paths (checked before anything is measured) -------------------------------------------------
for flag_name in ("--report", "--junit"):
    for what, path in [
        ("a folder", "a-dir"),
        ("under a file", "a-file/r.json"),
        ("under a file, deeper", "a-file/sub/r.json"),
        ("trailing slash", "new/"),
        ("empty", ""),
    ]:
        case(f"validate {flag_name} {what}", flag_name)(
            lambda w, f=flag_name, p=path: ["validate", w.onnx(), "--latency-ms", "100", f, p, *FAST]
        )

# -- ONNX files ---------------------------------------------------------------------------------------------------
case("validate missing file", "missing.onnx")(lambda w: ["validate", "missing.onnx"])
case("validate garbage file", "garbage.onnx")(lambda w: ["validate", w.raw("garbage.onnx", b"\x00\x01garbage")])
case("validate empty file", "empty.onnx")(lambda w: ["validate", w.raw("empty.onnx", b"")])
case("validate a folder", "a-dir")(lambda w: ["validate", "a-dir"])
for key, value in METADATA_CASES:
    case(f"metadata {key}={value!r}", f"flexslim.{key}")(
        lambda w, k=key, v=value: ["validate", w.onnx(**{k: v}), *FAST]
    )

# -- recipes (--set) and recipe files ------------------------------------------------------------------------------
for overrides, needle in RECIPE_CASES:
    case(f"train --set {overrides[0][:40]}", needle)(lambda w, o=overrides: ["train", *_sets(*o)])
case("train --recipe missing", "nosuch-recipe")(lambda w: ["train", "--recipe", "nosuch-recipe"])
case("train --recipe unsafe name", "recipe name")(
    lambda w: ["train", "--recipe", w.raw("r.toml", b'name = "/../../../../tmp/x"\n')]
)
case("train --recipe not TOML", "r.toml")(lambda w: ["train", "--recipe", w.raw("r.toml", b"[train\nepochs=")])
case("search --set unknown key", "nosuch")(lambda w: ["search", "--latency-ms", "1", "--set", "train.nosuch=1"])

# -- train: arch files, state files, resume ------------------------------------------------------------------------
case("train arch.json corrupt", "not valid JSON")(lambda w: ["train", w.raw("arch.json", b'{"version": 1')])
case("train --epochs 0", "--epochs")(lambda w: ["train", "--epochs", "0"])
case("train --epochs huge", "--epochs")(lambda w: ["train", "--epochs", "100000000"])
case("train arch.json --resume", "nothing to resume")(
    lambda w: ["train", w.raw("arch.json", arch_json(w._arch).encode()), "--resume"]
)
case("train --resume without a run", "nothing to resume")(lambda w: ["train", "--resume"])
case("train --resume without a state", "train_state.pt")(lambda w: ["train", w.run(), "--resume"])
case("train --resume garbage state", "train_state.pt")(lambda w: ["train", w.run(state=b"\x00junk"), "--resume"])
case("train --resume foreign state", "train_state.pt")(lambda w: ["train", w.run(state={"a": 1}), "--resume"])
case("train --resume other --epochs", "--epochs 3")(
    lambda w: ["train", w.run(state=_train_state(3)), "--resume", "--epochs", "5"]
)
case("train --resume other recipe", "another recipe")(
    lambda w: ["train", w.run(state=_train_state(3)), "--resume", "--epochs", "3", "--set", "train.lr=0.5"]
)

# -- search: budget, run directories, state files -------------------------------------------------------------------
for value in ("inf", "nan", "0", "-1"):
    case(f"search --latency-ms {value}", "--latency-ms")(lambda w, v=value: ["search", f"--latency-ms={v}"])
case("search --run-dir a file", "--run-dir")(lambda w: ["search", "--latency-ms", "1", "--run-dir", "a-file"])
case("search --run-dir under a file", "--run-dir")(lambda w: ["search", "--latency-ms", "1", "--run-dir", "a-file/run"])
case("search --run-dir in a missing folder", "--run-dir")(
    lambda w: ["search", "--latency-ms", "1", "--run-dir", "missing/run"]
)
case("search --latency-table missing", "t.json")(lambda w: ["search", "--latency-ms", "1", "--latency-table", "t.json"])
case("search --resume without runs", "--run-dir")(lambda w: ["search", "--latency-ms", "1", "--resume"])
case("search --resume corrupt run.json", "run.json")(
    lambda w: ["search", "--latency-ms", "1", "--resume", "--run-dir", w.run(run_json="{garbage")]
)
case("search --resume other --set", "search.epochs")(
    lambda w: ["search", "--latency-ms", "1", "--resume", "--run-dir", w.run(), "--set", "search.epochs=99"]
)
case("search --resume other --method", "search.method")(
    lambda w: ["search", "--latency-ms", "1", "--resume", "--run-dir", w.run(), "--method", "dmask"]
)
case("search --resume other budget", "start a new run")(
    lambda w: ["search", "--latency-ms", "1", "--resume", "--run-dir", w.run(run_json='{"budget_ms": 2.0}')]
)

# -- export ---------------------------------------------------------------------------------------------------------
case("export corrupt run.json", "run.json")(lambda w: ["export", "o.onnx", "--run-dir", w.run(run_json="[1, 2")])
case("export no model.pt", "model.pt")(lambda w: ["export", "o.onnx", "--run-dir", w.run()])
case("export into a folder", "OUT.onnx")(lambda w: ["export", "a-dir", "--run-dir", w.run()])
case("export under a file", "OUT.onnx")(lambda w: ["export", "a-file/o.onnx", "--run-dir", w.run()])
case("export run dir is a file", "a-file")(lambda w: ["export", "o.onnx", "--run-dir", "a-file"])

# -- profile --------------------------------------------------------------------------------------------------------
case("profile --out a folder", "--out")(lambda w: ["profile", "--out", "a-dir"])
case("profile --out under a file", "--out")(lambda w: ["profile", "--out", "a-file/t.json"])


def _runs_snapshot(root: Path) -> dict:
    runs = root / "runs"
    if not runs.exists():
        return {}
    latest = runs / "latest"
    return {
        "dirs": sorted(p.name for p in runs.iterdir()),
        "latest": str(latest.resolve()) if latest.exists() else None,
        "files": {str(p): p.read_bytes() for p in runs.rglob("*") if p.is_file() and p.name != ".lock"},
    }


def test_the_table_is_large_enough():
    assert len(CASES) >= 60, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("name, build, needle", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_exits_2_with_one_line(tmp_path, monkeypatch, make_onnx, tiny_arch, name, build, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXSLIM_LOG_DIR", str(tmp_path / "logs"))
    argv = build(World(tmp_path, make_onnx, tiny_arch))
    before = _runs_snapshot(tmp_path)
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, f"{argv}: exit {res.exit_code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    text = res.stderr.strip()
    assert "Traceback" not in res.output and "Traceback" not in res.stderr
    assert len(text.splitlines()) == 1, f"expected one line on stderr, got:\n{text}"
    assert text.startswith("error:") and needle in text, text
    assert _runs_snapshot(tmp_path) == before, "a rejected input created or changed a run, or moved runs/latest"
    assert not (tmp_path / "logs").exists(), "a bad input is not a crash"


def test_output_paths_are_checked_before_measuring(tmp_path, monkeypatch, make_onnx):
    monkeypatch.chdir(tmp_path)

    def boom(*args, **kwargs):
        raise AssertionError("measured before the output paths were checked")

    monkeypatch.setattr(importlib.import_module("flexslim.deploy.gate"), "validate", boom)
    (tmp_path / "a-file").write_text("x")
    res = CliRunner().invoke(app, ["validate", str(make_onnx()), "--report", "a-file/r.json"])
    assert res.exit_code == 2 and "--report" in res.stderr


def test_the_report_is_written_on_a_failed_gate(tmp_path, monkeypatch, make_onnx):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        app, ["validate", str(make_onnx()), "--latency-ms", "1e-9", "--report", "r.json", "--junit", "j.xml", *FAST]
    )
    assert res.exit_code == 1, res.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    assert "failure" in (tmp_path / "j.xml").read_text()


def test_an_internal_error_exits_3_naming_its_log(tmp_path, monkeypatch, make_onnx):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXSLIM_LOG_DIR", str(tmp_path / "logs"))

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(importlib.import_module("flexslim.deploy.gate"), "validate", bug)
    res = CliRunner().invoke(app, ["validate", str(make_onnx())])
    assert res.exit_code == 3, res.output
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert line.startswith("internal error") and "ZeroDivisionError" in line and "--debug" in line
    logs = list((tmp_path / "logs").iterdir())
    assert len(logs) == 1 and str(logs[0]) in line and "ZeroDivisionError: a bug" in logs[0].read_text()

    res = CliRunner().invoke(app, ["--debug", "validate", str(make_onnx())])  # --debug prints the traceback
    assert res.exit_code == 3 and "Traceback" in res.stderr


def test_debug_prints_the_traceback_of_a_bad_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["--debug", "validate", "missing.onnx"])
    assert res.exit_code == 2 and "Traceback" in res.stderr and res.stderr.rstrip().endswith("does not exist")
