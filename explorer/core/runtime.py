"""Process-wide settings: torch threads, devices and dtypes, and where the cache lives.

This module owns placement: `to_model` puts a tensor where the model computes, `to_host` makes
the CPU float32 copy that leaves the library; analyses build their tensors on HOST and call these.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from explorer.core.errors import ExplorerInputError

REPO_ROOT = Path(__file__).resolve().parents[2]


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


HOST = torch.device("cpu")  # results, caches and bookkeeping (ids, index lists, masks) are built here


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(requested: str = "auto") -> str:
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ExplorerInputError(f"Device {requested!r} was requested but no CUDA GPU is visible; "
                                     "use 'cpu' or 'auto'.")
        index = requested.partition(":")[2]
        if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise ExplorerInputError(f"Device {requested!r} does not exist: this machine has CUDA devices "
                                     f"0..{torch.cuda.device_count() - 1}; use 'cuda' or 'cuda:N' with one of those.")
        return requested
    if requested == "mps" and not _mps_available():
        raise ExplorerInputError("Device 'mps' was requested but Apple MPS is not available; use 'cpu' or 'auto'.")
    if requested not in ("cpu", "mps"):
        raise ExplorerInputError(f"Unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps.")
    return requested


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def pick_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """The torch dtype for `name`, checked on `device` with a small matrix product (what a model runs)."""
    if name not in DTYPES:
        raise ExplorerInputError(f"Unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    dtype = DTYPES[name]
    if dtype == torch.float64 and device != "cpu":
        # float64 is for numerical checks on the CPU; MPS has none and GPUs run it slowly.
        raise ExplorerInputError(f"dtype float64 is a CPU-only checking dtype; use float32 on {device!r} "
                                 "(or float64 with device 'cpu').")
    if dtype == torch.float32:
        strict_float32(device)
    try:
        _probe(device, dtype)
    except (RuntimeError, TypeError) as exc:
        raise ExplorerInputError(f"dtype {name} does not run on {device!r} here ({str(exc).splitlines()[0][:120]}); "
                                 "use float32, or bfloat16 where the device supports it.") from None
    return dtype


def _probe(device: str, dtype: torch.dtype) -> None:
    x = torch.ones(2, 2, device=device, dtype=dtype)
    (x @ x).sum().item()


def strict_float32(device: str) -> None:
    """On CUDA, float32 matrix products and convolutions run in full float32, not TF32 (10-bit mantissa
    inputs; recoveries drifted by up to 2.6e-4 from one trace per patch with it on). Process-wide, as
    torch's setting is; CIRCUIT_EXPLORER_ALLOW_TF32=1 leaves whatever the process chose."""
    if not device.startswith("cuda") or os.environ.get("CIRCUIT_EXPLORER_ALLOW_TF32") == "1":
        return
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False  # on by default: the causal convolutions of linear-attention layers


def to_model(lm, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x on the model's device. Floating tensors take the model's dtype, or `dtype` (float32 for
    maths that should not run in half precision); integer and bool tensors keep theirs."""
    if x.is_floating_point():
        return x.to(device=lm.device, dtype=dtype or lm.torch_model.dtype)
    return x.to(device=lm.device)


def to_host(x: torch.Tensor) -> torch.Tensor:
    """What leaves the library: detached, on the CPU, half precision widened to float32
    (float64, a CPU-only checking dtype, stays float64)."""
    x = x.detach().cpu()
    return x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
