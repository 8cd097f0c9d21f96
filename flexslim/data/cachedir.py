"""The user's flexslim cache folder: downloads (`data.sources`) and the latency cache (`latency.cache`) live there.

Apart from the data readers so that finding it imports no torch (the export job's gate path reads the latency
cache's re-timings without torch: `latency.rechecks`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_cache_dir() -> Path:
    """The user's flexslim cache folder (downloads here, the latency cache in its `latency/`): $FLEXSLIM_CACHE,
    else the platform's (`$XDG_CACHE_HOME/flexslim`, by default `~/.cache/flexslim`, on Linux;
    `~/Library/Caches/flexslim` on macOS; `%LOCALAPPDATA%\\flexslim\\Cache` on Windows)."""
    env = os.environ.get("FLEXSLIM_CACHE", "").strip()
    if env:
        return Path(env).expanduser().absolute()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "flexslim"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "flexslim" / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "flexslim"
