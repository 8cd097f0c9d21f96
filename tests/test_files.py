"""Issue #18.7: the run lock never follows a symlink, writes keep the umask (or the replaced file's mode), a full
disk is exit 2, a torn last JSONL line is tolerated, runs/latest moves when a run finishes, run folders are claimed
exclusively, `export` names its run."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from typer.testing import CliRunner

from flexslim.cli import app
from flexslim.errors import BadInput
from flexslim.system import files, runs
from flexslim.system.exits import outcome_for
from flexslim.system.files import append_jsonl, atomic_write_text, drop_torn_line, read_jsonl
from flexslim.system.locks import lock_run, release_run
from flexslim.system.runs import mark_latest, mark_started, new_run_dir, resolve_run_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- the lock ------------------------------------------------------------------------------------------------------
def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(BadInput, match="not a plain file"):
        lock_run(run)
    assert victim.read_text() == "keep me\n"


def test_a_fifo_lock_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ".lock")
    with pytest.raises(BadInput, match="not a plain file"):
        lock_run(run)


def test_a_symlinked_lock_through_the_cli_is_exit_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "bashrc"
    victim.write_text("keep me\n")
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / ".lock").symlink_to(victim)
    res = CliRunner().invoke(app, ["search", "--latency-ms", "1", "--run-dir", str(run), "--set", "search.epochs=1"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output
    assert ".lock" in lines[0] and victim.read_text() == "keep me\n"
    assert not (run / "run.json").exists() and not (tmp_path / "runs" / "latest").exists()


def test_a_plain_lock_still_works(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock_run(run)
    try:
        assert (run / ".lock").read_text().strip() == str(os.getpid())
    finally:
        release_run(run)


# -- modes, fsync, full disks --------------------------------------------------------------------------------------
def test_new_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
        os.umask(0o077)
        assert _mode(atomic_write_text(tmp_path / "b.txt", "x")) == 0o600
    finally:
        os.umask(old)


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o640


def test_the_folder_is_fsynced_after_the_replace(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(files, "fsync_dir", lambda folder: synced.append(str(folder)))
    atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == [str(tmp_path)]


@pytest.mark.parametrize("code", sorted(files.DISK_FULL))
def test_a_full_disk_is_bad_input_naming_the_file(tmp_path, monkeypatch, code):
    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", full)
    target = tmp_path / "run.json"
    with pytest.raises(BadInput, match=r"disk full writing .*run\.json"):
        atomic_write_text(target, "x")
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(BadInput, match=r"disk full writing .*log\.jsonl"):
        append_jsonl(tmp_path / "log.jsonl", {"a": 1})


def test_an_unmapped_full_disk_is_exit_2_not_a_bug():
    out = outcome_for(OSError(errno.ENOSPC, "No space left on device", "/x/model.pt"))
    assert out.code == 2 and out.line.startswith("error: disk full writing /x/model.pt") and out.traceback is None


# -- JSON lines -------------------------------------------------------------------------------------------------
def test_a_torn_last_line_is_ignored_and_cut_on_resume(tmp_path):
    path = tmp_path / "search.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    assert drop_torn_line(path) and path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    append_jsonl(path, {"epoch": 3})
    assert [r["epoch"] for r in read_jsonl(path)] == [1, 2, 3]
    assert not drop_torn_line(path)  # whole lines: nothing to cut


def test_a_last_line_without_newline_but_whole_is_kept(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}')
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]


# -- runs/latest, run folders, export ------------------------------------------------------------------------------
def test_latest_is_the_newest_finished_run_and_started_is_for_resume(tmp_path):
    root = tmp_path / "runs"
    first = new_run_dir("a", root)
    mark_started(first, root)  # a workspace's first run: latest points at it from the start
    assert (root / "latest").resolve() == first.resolve()
    mark_latest(first, root)
    second = new_run_dir("b", root)
    mark_started(second, root)  # another job's run, still running: latest stays on the finished one
    assert (root / "latest").resolve() == first.resolve()
    assert resolve_run_dir(None, root) == first.resolve()
    assert resolve_run_dir(None, root, resume=True) == second.resolve()  # a bare --resume: the newest started
    mark_latest(second, root)
    assert resolve_run_dir(None, root) == second.resolve()


def test_resume_without_a_started_pointer_falls_back_to_latest(tmp_path):
    root = tmp_path / "runs"
    run = new_run_dir("a", root)
    mark_latest(run, root)
    assert resolve_run_dir(None, root, resume=True) == run.resolve()


def test_run_folders_are_claimed_even_when_the_name_appears_meanwhile(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20250101-000000")
    real_mkdir = type(root).mkdir
    raced = []

    def racing_mkdir(self, *args, **kwargs):  # another job takes the name between a check and the mkdir
        if self.name == "20250101-000000-q" and not raced:
            raced.append(1)
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(root), "mkdir", racing_mkdir)
    got = new_run_dir("q", root)
    assert got.name == "20250101-000000-q-2" and got.is_dir()
    assert new_run_dir("q", root).name == "20250101-000000-q-3"


def test_export_names_the_run_it_used(tmp_path, monkeypatch):
    from flexslim.jobs import export as export_job

    monkeypatch.chdir(tmp_path)
    run = new_run_dir("q", tmp_path / "runs")
    mark_latest(run, tmp_path / "runs")

    class Result:
        path, size_bytes, opset, parity_max_abs, copied_from = tmp_path / "m.onnx", 1000, 17, 0.0, None

    monkeypatch.setattr(
        "flexslim.jobs.export.export_run",
        lambda output, run_dir, **kw: export_job.RunExport(Result(), None, resolve_run_dir(run_dir)),
    )
    res = CliRunner().invoke(app, ["export", "m.onnx"])
    assert res.exit_code == 0, res.output
    assert f"run {run.resolve()}" in res.stdout
