"""Run directories, atomic writes and the `runs/latest` pointer.

Every file flexslim writes goes through `atomic_write_*`: a temp file in the same folder, fsync, then
os.replace, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from flexslim.errors import BadInput

RUNS_ROOT = Path("runs")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
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
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one line; each line is written with a single write() so a crash leaves whole lines."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def new_run_dir(recipe_name: str, root: Path = RUNS_ROOT) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{stamp}-{recipe_name}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{recipe_name}-{n}"
    path.mkdir(parents=True)
    return path


def mark_latest(run_dir: Path, root: Path = RUNS_ROOT) -> None:
    """Point `root/latest` at run_dir (a relative symlink, swapped atomically)."""
    root.mkdir(parents=True, exist_ok=True)
    link = root / "latest"
    tmp = root / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(os.path.relpath(run_dir.resolve(), root.resolve())))
    os.replace(tmp, link)


def resolve_run_dir(run_dir: str | Path | None, root: Path = RUNS_ROOT) -> Path:
    if run_dir is None:
        latest = root / "latest"
        if not latest.exists():
            raise BadInput(
                f"no run found at {latest}; run `flexslim search` or `flexslim train` first, or pass --run-dir"
            )
        return latest.resolve()
    path = Path(run_dir)
    if not path.is_dir():
        raise BadInput(f"run directory {path} does not exist")
    return path
