"""Run directories, atomic writes and the `runs/latest` and `runs/.started` pointers.

`runs/latest` is the newest run that FINISHED (its search, and its retraining when it retrains; a `flexslim train`
run: its training), so a bare `flexslim export` never picks a run another job in the same workspace is still
writing; the one exception is a workspace's first run, which `runs/latest` points at from its start (there is no
other run it could be confused with). `runs/.started` is the newest search started here: a bare
`flexslim search --resume` continues it, finished or not (a finished search and retraining are reused, a run
another job still holds is refused by its lock, exit 2), and falls back to `runs/latest` where there is none.

Every file flexslim writes goes through `atomic_write_*`: a temp file in the same folder, fsync, then
os.replace, so a crash leaves either the old file or the new one, never half of one. Under torchrun only rank 0
writes: on the other ranks these writes (and `remove`, `mark_latest`) do nothing, so every file is written once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flexslim.errors import BadInput
from flexslim.system.distributed import is_main
from flexslim.system.files import atomic_write_json

RUNS_ROOT = Path("runs")


def new_run_dir(recipe_name: str, root: Path = RUNS_ROOT) -> Path:
    """A new, empty `root/<time>-<recipe>` folder (suffixed -2, -3, ... when the name is taken). Under torchrun,
    call it on rank 0 (`distributed.on_main`) and hand the path to the others."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:  # mkdir is the claim: two runs started in the same second each get a folder of their own
        path = root / (f"{stamp}-{recipe_name}" if n == 1 else f"{stamp}-{recipe_name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


LATEST = "latest"  # the newest finished run (export, train and validate read it by default)
STARTED = ".started"  # the newest search started here (a bare `search --resume` continues it)


def _point(name: str, run_dir: Path, root: Path) -> None:
    """Point `root/name` at run_dir (a relative symlink, swapped atomically)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name.lstrip('.')}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(os.path.relpath(Path(run_dir).resolve(), root.resolve())))
    os.replace(tmp, root / name)


def mark_latest(run_dir: Path, root: Path = RUNS_ROOT) -> None:
    """Point `root/latest` at run_dir, a run that has finished (see the module notes); rank 0 only."""
    if is_main():
        _point(LATEST, run_dir, root)


def mark_started(run_dir: Path, root: Path = RUNS_ROOT, *, resumable: bool = True) -> None:
    """A run was just created: `root/.started` points at it (`resumable`, a search), and `root/latest` too only
    when it points at no run yet (a workspace's first run); rank 0 only."""
    if not is_main():
        return
    if resumable:
        _point(STARTED, run_dir, root)
    if not (root / LATEST).is_dir():
        _point(LATEST, run_dir, root)


def check_run_dir_path(run_dir: str | Path | None, flag_name: str = "--run-dir") -> Path | None:
    """A `--run-dir` for a new run, checked before anything is created: a folder or a new name, never a file,
    inside an existing folder (None stays None: the default `runs/<time>-<recipe>`)."""
    from flexslim.recipe.checks import check_output_dir

    return None if run_dir is None else check_output_dir(run_dir, flag_name)


def resolve_run_dir(run_dir: str | Path | None, root: Path = RUNS_ROOT, *, resume: bool = False) -> Path:
    """`run_dir`, or the run `root/latest` points at (with `resume`: `root/.started` first); BadInput when there
    is none."""
    if run_dir is None:
        started = root / STARTED
        if resume and started.is_dir():
            return started.resolve()
        latest = root / LATEST
        if not latest.exists():
            raise BadInput(
                f"no run found at {latest}; run `flexslim search` or `flexslim train` first, or pass --run-dir"
            )
        return latest.resolve()
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise BadInput(f"run directory {path} is a file, not a folder; pass the run's folder")
    if not path.is_dir():
        raise BadInput(f"run directory {path} does not exist")
    return path


class RunRecord:
    """The one owner of a run directory's `run.json`: load it once, update it in memory, save atomically.

    Every stage of a job updates the record it was handed (`record.update(status="searched", ...)` saves at
    once), so nothing reads `run.json` back while it is in memory. Example::

        record = RunRecord.load(run_dir)          # {} when the run has none yet
        record.update(budget_ms=0.06, status="started")
        record["budget_ms"]                        # 0.06
    """

    FILE = "run.json"

    def __init__(self, run_dir: Path, data: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.data: dict[str, Any] = dict(data or {})

    @property
    def path(self) -> Path:
        """The run's run.json."""
        return self.run_dir / self.FILE

    @classmethod
    def load(cls, run_dir: str | Path) -> RunRecord:
        """The record of `run_dir` (empty when it has no run.json); a corrupt file is BadInput naming it."""
        path = Path(run_dir) / cls.FILE
        if not path.is_file():
            return cls(Path(run_dir))
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInput(f"{path} is not valid JSON ({err}); delete the run or start a new one") from None
        if not isinstance(data, dict):
            raise BadInput(f"{path} is not a flexslim run record (expected a JSON object)")
        return cls(Path(run_dir), data)

    def exists(self) -> bool:
        """True when run.json exists."""
        return self.path.is_file()

    def search_finished(self) -> bool:
        """The run's search and bake are done (arch.json written, status searched or done)."""
        return (self.run_dir / "arch.json").is_file() and self.get("status") in ("searched", "done")

    def get(self, key: str, default: Any = None) -> Any:
        """A recorded value, or `default`."""
        return self.data.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def update(self, **fields: Any) -> RunRecord:
        """Merge `fields` into the record and save it."""
        self.data.update(fields)
        return self.save()

    def save(self) -> RunRecord:
        """Write run.json atomically."""
        atomic_write_json(self.path, self.data)
        return self


def recorded_settings(s, provider: str) -> dict:
    """The latency settings run.json records (and `flexslim export`'s gate measures with): provider, batch,
    threads, percentile and the per-measurement timeout; the precision the network is deployed at (with its int8
    format and calibration count)."""
    return {
        "provider": provider,
        "batch": s.batch,
        "threads": s.threads,
        "percentile": s.percentile,
        "timeout": s.timeout,
        "precision": s.precision,
        "int8_format": s.int8_format,
        "calibration": s.calibration,
    }
