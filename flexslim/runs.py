"""Run directories, atomic writes and the `runs/latest` pointer.

Every file flexslim writes goes through `atomic_write_*`: a temp file in the same folder, fsync, then
os.replace, so a crash leaves either the old file or the new one, never half of one. Under torchrun only rank 0
writes: on the other ranks these writes (and `remove`, `mark_latest`) do nothing, so every file is written once.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from flexslim.distributed import is_main
from flexslim.errors import BadInput

RUNS_ROOT = Path("runs")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace); rank 0 only."""
    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """`atomic_write_bytes` of indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """`torch.save` into memory, then `atomic_write_bytes` (a crash never leaves half a checkpoint)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one line; each line is written with a single write() so a crash leaves whole lines. Rank 0 only."""
    if not is_main():
        return
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def remove(path: str | Path) -> None:
    """Delete a file of the run if it is there (rank 0 only, like every write)."""
    if is_main():
        Path(path).unlink(missing_ok=True)


def new_run_dir(recipe_name: str, root: Path = RUNS_ROOT) -> Path:
    """A new, empty `root/<time>-<recipe>` folder (suffixed -2, -3, ... when the name is taken). Under torchrun,
    call it on rank 0 (`distributed.on_main`) and hand the path to the others."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{stamp}-{recipe_name}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{recipe_name}-{n}"
    path.mkdir(parents=True)
    return path


def mark_latest(run_dir: Path, root: Path = RUNS_ROOT) -> None:
    """Point `root/latest` at run_dir (a relative symlink, swapped atomically); rank 0 only."""
    if not is_main():
        return
    root.mkdir(parents=True, exist_ok=True)
    link = root / "latest"
    tmp = root / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(os.path.relpath(run_dir.resolve(), root.resolve())))
    os.replace(tmp, link)


def check_run_dir_path(run_dir: str | Path | None, flag_name: str = "--run-dir") -> Path | None:
    """A `--run-dir` for a new run, checked before anything is created: a folder or a new name, never a file,
    inside an existing folder (None stays None: the default `runs/<time>-<recipe>`)."""
    from flexslim.checks import check_output_dir

    return None if run_dir is None else check_output_dir(run_dir, flag_name)


def resolve_run_dir(run_dir: str | Path | None, root: Path = RUNS_ROOT) -> Path:
    """`run_dir`, or the run `root/latest` points at; BadInput when there is none."""
    if run_dir is None:
        latest = root / "latest"
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


# -- one process per run: an flock on run_dir/.lock, held until the job ends (or the process does) ------------
LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}  # resolved run dir -> the fd whose flock this process holds


def lock_run(run_dir: str | Path) -> Path:
    """Take the run's lock (`run_dir/.lock`, fcntl.flock) for this process; BadInput naming the pid that holds it.

    Re-entrant within one process (a job that opens its run twice keeps one lock). The lock lives until
    `release_run(run_dir)` / `release_runs()` or the end of the process (the kernel drops it, even on kill -9).
    """
    key = str(Path(run_dir).resolve())
    if key in _HELD or not is_main():  # under torchrun rank 0 holds the run's lock for the whole job
        return Path(run_dir)
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise BadInput(
            f"run {run_dir} is in use by pid {pid}; wait for that job to end (or stop it), or pick another --run-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    return Path(run_dir)


def release_run(run_dir: str | Path) -> None:
    """Drop this process's lock on `run_dir` (no-op when it holds none)."""
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def release_runs() -> None:
    """Drop every run lock this process holds (the CLI calls it when a command ends)."""
    for key in list(_HELD):
        os.close(_HELD.pop(key))


def content_hash(text: str) -> str:
    """sha256 hex digest of `text` (the identity of a resolved recipe in checkpoints)."""
    return hashlib.sha256(text.encode()).hexdigest()


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
        return self.path.is_file()

    def search_finished(self) -> bool:
        """The run's search and bake are done (arch.json written, status searched or done)."""
        return (self.run_dir / "arch.json").is_file() and self.get("status") in ("searched", "done")

    def get(self, key: str, default: Any = None) -> Any:
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
        atomic_write_json(self.path, self.data)
        return self


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSON-lines file written by `append_jsonl` ([] when absent); BadInput naming a corrupt file."""
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path} is not valid JSON lines ({err}); delete the run or start a new one") from None
