import json
import os
import re

import pytest
import torch

from flexslim.errors import BadInput
from flexslim.system.files import (
    append_jsonl,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from flexslim.system.runs import mark_latest, new_run_dir, resolve_run_dir


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writes(tmp_path):
    p = atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")  # creates the parent folder
    assert p.read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text() == "héllo\n"
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2.5], "b": None})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2.5], "b": None}
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_write_replaces_and_failure_keeps_old_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]  # fails inside the write
    assert path.read_text() == "new"  # the previous file is intact ...
    assert _leftovers(tmp_path) == []  # ... and no temp file is left behind


def test_atomic_torch_save_loads_weights_only(tmp_path):
    obj = {"w": torch.arange(6.0).view(2, 3), "meta": {"epoch": 3}, "names": ["a"]}
    atomic_torch_save(tmp_path / "x.pt", obj)
    back = torch.load(tmp_path / "x.pt", weights_only=True)
    assert torch.equal(back["w"], obj["w"]) and back["meta"] == {"epoch": 3} and back["names"] == ["a"]


def test_append_jsonl(tmp_path):
    path = tmp_path / "log.jsonl"
    for i in range(3):
        append_jsonl(path, {"step": i, "loss": 1.0 / (i + 1)})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]


def test_new_run_dir_is_unique(tmp_path):
    root = tmp_path / "runs"
    a = new_run_dir("quickstart", root)
    b = new_run_dir("quickstart", root)
    assert a != b and a.is_dir() and b.is_dir()
    assert a.parent == root == b.parent
    for d in (a, b):
        assert re.fullmatch(r"\d{8}-\d{6}-quickstart(-\d+)?", d.name), d.name


def test_mark_latest_and_resolve(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(BadInput, match="--run-dir"):
        resolve_run_dir(None, root)
    a, b = new_run_dir("x", root), new_run_dir("x", root)
    mark_latest(a, root)
    link = root / "latest"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))  # relative: the runs folder can move
    assert resolve_run_dir(None, root) == a.resolve()
    mark_latest(b, root)
    assert resolve_run_dir(None, root) == b.resolve()
    assert [p.name for p in root.iterdir() if p.name.startswith(".latest")] == []
    # the folder keeps working after a move
    moved = tmp_path / "moved"
    root.rename(moved)
    assert (moved / "latest").resolve() == (moved / b.name).resolve()


def test_resolve_explicit_run_dir(tmp_path):
    assert resolve_run_dir(tmp_path) == tmp_path
    with pytest.raises(BadInput, match="does not exist"):
        resolve_run_dir(tmp_path / "missing")


def test_run_record_updates_in_memory_and_saves_atomically(tmp_path):
    from flexslim.system.runs import RunRecord

    record = RunRecord.load(tmp_path)
    assert not record.exists() and record.get("status") is None
    record.update(budget_ms=0.06, status="started")
    assert json.loads((tmp_path / "run.json").read_text()) == {"budget_ms": 0.06, "status": "started"}
    record.update(status="searched")
    again = RunRecord.load(tmp_path)
    assert again["budget_ms"] == 0.06 and again["status"] == "searched" and "status" in again
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left behind


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_corrupt_run_record_is_bad_input_naming_the_file(tmp_path, text):
    from flexslim.system.runs import RunRecord

    (tmp_path / "run.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(BadInput, match="run.json") as err:
        RunRecord.load(tmp_path)
    assert "\n" not in str(err.value)


# -- issue 9: corrupt files name themselves; run directories are checked before anything is made ---------------
def test_corrupt_jsonl_is_bad_input_naming_it(tmp_path):
    from flexslim.system.files import read_jsonl

    path = tmp_path / "search.jsonl"
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')  # a broken line in the middle (a torn LAST line is
    with pytest.raises(BadInput, match="search.jsonl"):  # a kill mid-append: tests/test_files.py)
        read_jsonl(path)


def test_run_dir_paths(tmp_path):
    from flexslim.system.runs import check_run_dir_path

    (tmp_path / "f").write_text("x")
    assert check_run_dir_path(None) is None
    assert check_run_dir_path(tmp_path / "new") == tmp_path / "new"  # a new name in an existing folder
    assert check_run_dir_path(tmp_path) == tmp_path  # an existing folder
    for bad in (tmp_path / "f", tmp_path / "f" / "run", tmp_path / "missing" / "run"):
        with pytest.raises(BadInput, match="--run-dir"):
            check_run_dir_path(bad)
    with pytest.raises(BadInput, match="is a file"):
        resolve_run_dir(tmp_path / "f")
