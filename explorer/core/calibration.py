"""What a traced pass costs on this device: the numbers behind the pass scheduler's cost model.

A pass of n tokens through k layers is modelled as  overhead + k * u * (n + small_batch),  where
u = 2 * (parameters of a layer) / flops_per_s. A short probe times a few traced passes of the loaded
model at first use (one token through all layers and through one, a growing batch) and fits the
three numbers; they are kept per (device, dtype, threads, model shape) in memory and under
cache/calibration/. CIRCUIT_EXPLORER_PASS_COSTS=constants uses the fixed CPU numbers instead (tests, or
anyone who wants the scheduler's choices not to depend on a measurement). Core: imports engine and
runtime only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass

import torch

from explorer.core import engine
from explorer.core.runtime import HOST, cache_dir

VERSION = 2  # bump when the probe or the model changes: older files are then ignored


@dataclass(frozen=True)
class PassCosts:
    overhead_s: float  # fixed cost of one traced pass (Python, hooks, kernel launches)
    flops_per_s: float  # matmul throughput on the model's layers
    small_batch_tokens: float  # a pass over n token rows costs about (1 + this / n) times its FLOPs
    source: str = "constants"  # constants | measured | disk
    probe_s: float = 0.0  # how long the probe took


# Fitted by hand to one thread of a 2-core AMD EPYC (Zen 3) in float32; the fallback and the test setting.
CPU_CONSTANTS = PassCosts(overhead_s=0.006, flops_per_s=4e10, small_batch_tokens=32)

_MEMO: dict[str, PassCosts] = {}
_LOCK = threading.Lock()  # one probe at a time: two probes on one device would time each other


def _layer_flops(lm) -> float:
    """FLOPs per token of one layer's matrix products (2 per parameter)."""
    return 2.0 * sum(p.numel() for p in lm.sites.layer(lm.torch_model, 0).parameters())


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return torch.cuda.get_device_name(index)
    return platform.processor() or platform.machine()


def calibration_key(lm) -> str:
    """Device, dtype, threads and model shape: what the probe's answer depends on (not the weights)."""
    arch = lm.arch
    payload = {"v": VERSION, "device": lm.device, "name": _device_name(lm.device), "dtype": lm.dtype,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "family": arch.name,
               "layers": arch.n_layers, "d_model": arch.d_model, "heads": arch.n_heads, "kv": arch.n_kv_heads,
               "head_dim": arch.head_dim, "layer_flops": _layer_flops(lm)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def pass_costs(lm) -> PassCosts:
    """The cost model's numbers for this model on its device: measured once, then remembered."""
    if os.environ.get("CIRCUIT_EXPLORER_PASS_COSTS", "measure") == "constants":
        return CPU_CONSTANTS
    key = calibration_key(lm)
    hit = _MEMO.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        path = cache_dir() / "calibration" / f"{key}.json"
        try:
            costs = PassCosts(**{**json.loads(path.read_text()), "source": "disk"})
        except (OSError, ValueError, TypeError):
            costs = measure(lm)
            with contextlib.suppress(OSError):  # a read-only cache only costs a probe per process
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".{os.getpid()}.tmp")
                partial.write_text(json.dumps(asdict(costs)))
                partial.replace(path)  # atomic: another process never reads half a file
        _MEMO[key] = costs
    return costs


def _timed(lm, ids: torch.Tensor, skip: int = 0, repeat: int = 3) -> float:
    """Best of `repeat` traced passes after one warm-up (first calls allocate and compile)."""
    skip_value = torch.zeros(*ids.shape, lm.arch.d_model, device=HOST) if skip else None
    best = float("inf")
    for i in range(repeat + 1):
        start = time.perf_counter()
        engine.run(lm, ids, options=engine.PassOptions(skip_layers=skip, skip_value=skip_value, answers=(0, 1)))  # logits on the CPU: synced
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def measure(lm, max_tokens: int = 4096, max_seconds: float = 1.5) -> PassCosts:
    """Fit overhead, throughput and the small-batch charge from a handful of traced passes."""
    n_layers, calls, started = lm.arch.n_layers, lm.forward_calls, time.perf_counter()
    one = torch.zeros(1, 1, dtype=torch.long, device=HOST)
    t_one = _timed(lm, one)
    # One token through one layer: nearly all of it is the pass's own cost (Python, hooks, launches).
    t_layer = _timed(lm, one, skip=n_layers - 1) if n_layers > 1 else t_one
    # Grow the batch (rows of 8 tokens, so attention stays small) until compute is most of the pass.
    # The line through the last size and the one two doublings before is the throughput where the
    # scheduler's passes live (tens to hundreds of tokens); a line from one token would charge a big
    # pass the slower per-token cost of small matrix products. A GPU may stay flat for thousands of
    # tokens, a CPU rises within a few dozen.
    sizes, times = [1], [t_one]
    n = 16
    while True:
        sizes.append(n)
        times.append(_timed(lm, torch.zeros(n // 8, 8, dtype=torch.long, device=HOST), repeat=2))
        if times[-1] > 4 * t_one or n >= max_tokens or time.perf_counter() - started > max_seconds:
            break
        n *= 2
    lm.forward_calls = calls  # the probe is not an experiment's pass (tests count those)
    low = max(len(sizes) - 3, 0)
    u = max((times[-1] - times[low]) / (n_layers * (sizes[-1] - sizes[low])), 1e-12)  # s per token per layer
    intercept = times[-1] - n_layers * u * sizes[-1]  # a pass of no tokens, on that line
    # What the line puts at zero tokens beyond the pass's own cost is charged per layer run: the
    # small-batch term, in tokens' worth of compute.
    small = min(max((intercept - t_layer) / (n_layers * u), 0.0), 4096.0)
    overhead = min(max(t_layer - u * (1 + small), 1e-5), t_one)
    return PassCosts(overhead_s=overhead, flops_per_s=_layer_flops(lm) / u, small_batch_tokens=small,
                     source="measured", probe_s=time.perf_counter() - started)


def clear() -> None:
    """Forget measured costs held in memory (files under cache/calibration stay)."""
    _MEMO.clear()
