"""One process per run directory: run_dir/.lock (fcntl.flock) held for a job's lifetime."""

import subprocess
import sys

import pytest

from flexslim.errors import BadInput
from flexslim.recipe.schema import load_recipe, recipe_to_toml
from flexslim.system.locks import lock_run, release_run, release_runs

OTHER = "import sys; from flexslim.system.locks import lock_run; lock_run(sys.argv[1]); print('locked')"


def _other_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, check=False)


def test_a_second_process_is_refused_naming_the_pid(tmp_path):
    import os

    lock_run(tmp_path)
    try:
        lock_run(tmp_path)  # re-entrant in one process
        proc = _other_process("-c", OTHER, str(tmp_path))
        assert proc.returncode != 0 and f"in use by pid {os.getpid()}" in proc.stderr
    finally:
        release_run(tmp_path)
    assert _other_process("-c", OTHER, str(tmp_path)).stdout.strip() == "locked"  # released


def test_search_resume_of_a_run_in_use_is_bad_input(tmp_path):
    import os

    (tmp_path / "recipe.toml").write_text(recipe_to_toml(load_recipe("quickstart")))
    lock_run(tmp_path)
    try:
        proc = _other_process("-m", "flexslim", "search", "--latency-ms", "1", "--resume", "--run-dir", str(tmp_path))
    finally:
        release_runs()
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and f"is in use by pid {os.getpid()}" in line and "Traceback" not in line
    assert not (tmp_path / "run.json").exists()


def test_lock_of_a_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises((FileNotFoundError, BadInput)):
        lock_run(tmp_path / "nope")
