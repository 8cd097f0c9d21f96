"""Atomic writes (temp file in the same folder, fsync, os.replace, fsync of the folder), JSONL append/read and
content hashes.

Files are written with the user's umask (a new file) or the mode of the file they replace; a full disk or quota
(ENOSPC, EDQUOT) is BadInput "disk full writing X" (exit 2), not a crash. `read_jsonl` ignores a torn last line
(a kill in the middle of an append); `drop_torn_line` cuts it off before a resumed run appends again.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from flexslim.errors import BadInput
from flexslim.system.distributed import is_main

DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def disk_full(err: OSError, path: str | Path) -> BadInput:
    """The BadInput of a write that ran out of space or quota (`err.errno` in DISK_FULL)."""
    return BadInput(f"disk full writing {path} ({os.strerror(err.errno)}); free some space or write elsewhere")


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The mode a file written at `path` gets: that of the regular file it replaces, else 0666 minus the umask."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder, so a rename in it survives a power loss (skipped where the filesystem cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace, fsync of the folder);
    rank 0 only. The file gets the mode of the one it replaces, else the user's umask; BadInput when the disk or
    quota is full."""
    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as err:
        if err.errno in DISK_FULL:
            raise disk_full(err, path) from None
        raise
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
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
    try:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.errno in DISK_FULL:
            raise disk_full(err, path) from None
        raise


def drop_torn_line(path: str | Path) -> bool:
    """Cut a torn last line (no newline at the end: an append cut short by a kill) off a JSON-lines file, so the
    next append starts a line of its own; True when something was cut. Rank 0 only; a missing file is left alone."""
    path = Path(path)
    if not is_main() or not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return True


def remove(path: str | Path) -> None:
    """Delete a file of the run if it is there (rank 0 only, like every write)."""
    if is_main():
        Path(path).unlink(missing_ok=True)


def content_hash(text: str) -> str:
    """sha256 hex digest of `text` (the identity of a resolved recipe in checkpoints)."""
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in chunks (a latency table's, a model.pt's, an export's)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSON-lines file written by `append_jsonl` ([] when absent); BadInput naming a corrupt file.

    A torn last line (no newline after it and not valid JSON: an append cut short by a kill) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop() if lines else b""  # the text after the last newline: b"" when the file ends with one
    try:
        out = [json.loads(line) for line in lines if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path} is not valid JSON lines ({err}); delete the run or start a new one") from None
    if torn.strip():
        try:
            out.append(json.loads(torn))
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # torn by a kill mid-append: the epochs before it are whole
    return out
