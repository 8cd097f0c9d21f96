"""Atomic writes (temp file in the same folder, fsync, os.replace), JSONL append/read and content hashes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flexslim.errors import BadInput
from flexslim.system.distributed import is_main


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


def content_hash(text: str) -> str:
    """sha256 hex digest of `text` (the identity of a resolved recipe in checkpoints)."""
    return hashlib.sha256(text.encode()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSON-lines file written by `append_jsonl` ([] when absent); BadInput naming a corrupt file."""
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path} is not valid JSON lines ({err}); delete the run or start a new one") from None
