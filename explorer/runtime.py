"""Process-wide settings: torch threads, device choice and where the cache lives."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from explorer.errors import ExplorerInputError

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """cache/ at the repo root unless CIRCUIT_EXPLORER_CACHE says otherwise; made on demand."""
    path = Path(os.environ.get("CIRCUIT_EXPLORER_CACHE", REPO_ROOT / "cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_threads() -> int:
    # On small CPUs a second busy process makes multi-threaded torch crawl (30-140x slower
    # was measured on 2 cores), so one thread is the safe default there.
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else min(cores // 2, 8)


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads from `n`, $CIRCUIT_EXPLORER_THREADS, or the default."""
    if n is None:
        env = os.environ.get("CIRCUIT_EXPLORER_THREADS")
        n = int(env) if env else default_threads()
    if n < 1:
        raise ExplorerInputError("The number of torch threads must be at least 1.")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def pick_device(requested: str = "auto") -> str:
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ExplorerInputError("Device 'cuda' was requested but no CUDA GPU is visible; use 'cpu' or 'auto'.")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ExplorerInputError("Device 'mps' was requested but Apple MPS is not available; use 'cpu' or 'auto'.")
    if requested not in ("cpu", "mps") and not requested.startswith("cuda"):
        raise ExplorerInputError(f"Unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps.")
    return requested


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def pick_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ExplorerInputError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]
