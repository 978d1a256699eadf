"""The memory budget: how many bytes a traced pass may use, what a token row costs, and what to do
when the device runs out anyway (halve the chunk once, then say what to change).

Core: imports errors and runtime only; the scheduler, ablation and attribution size their passes here.
"""
from __future__ import annotations

import gc
import os
from typing import Callable, Sequence

import torch

from explorer.core.errors import ExplorerInputError

ENV = "CIRCUIT_EXPLORER_MEMORY_BUDGET_MB"
FREE_FRACTION = {"cuda": 0.8, "mps": 0.5, "cpu": 0.5}  # of the memory free when a sweep starts


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if device == "mps":
        return max(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(), 0)
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional; Linux and macOS answer through sysconf
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(lm, budget_mb: float | None = None) -> int:
    """Bytes a pass may use: `budget_mb`, else $CIRCUIT_EXPLORER_MEMORY_BUDGET_MB, else a fraction of
    the device's free memory (other programs and the allocator's slack need the rest)."""
    if budget_mb is None and os.environ.get(ENV):
        budget_mb = float(os.environ[ENV])
    if budget_mb is not None:
        if budget_mb <= 0:
            raise ExplorerInputError(f"The memory budget must be a positive number of MB, not {budget_mb}.")
        return int(budget_mb * 2**20)
    kind = lm.device.split(":")[0]
    return int(_free_bytes(lm.device) * FREE_FRACTION.get(kind, 0.5))


def _element_size(lm) -> int:
    return torch.finfo(lm.torch_model.dtype).bits // 8


def kv_bytes(lm) -> int:
    """Key/value cache of one token over all layers."""
    arch = lm.arch
    return 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * _element_size(lm)


def token_bytes(lm, keys: int, grad: bool = False) -> int:
    """Bytes one query token costs in a pass whose tokens attend to `keys` keys (eager attention).
    Its key/value cache over all layers, plus one layer's transient activations (residual, norm,
    q/k/v/o, the MLP's up/gate/activation) and attention scores and probabilities, and its mask row.
    With grad (attribution) autograd keeps every layer's activations and probabilities for backward."""
    arch, config = lm.arch, lm.torch_model.config
    d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * arch.d_model
    per_layer = 8 * arch.d_model + 3 * d_ff + 2 * arch.n_heads * keys
    layers = arch.n_layers if grad else 1
    return kv_bytes(lm) + (layers * per_layer + keys) * _element_size(lm)


def rows_per_pass(lm, n_pos: int, budget: int, cap: int) -> int:
    """Batch rows of n_pos tokens one pass may hold (at most `cap`, at least 1), each also returning its
    last position's logits over the vocabulary."""
    row = n_pos * token_bytes(lm, n_pos) + lm.arch.vocab_size * 4
    return max(1, min(cap, budget // row))


def packed_tokens(lm, budget: int, prefix: int, cap: int) -> int:
    """Most tokens one packed sequence may hold (each sees `prefix` cached positions and the whole
    sequence): attention makes its memory grow with the square, so search rather than divide."""
    fits = lambda n: n * token_bytes(lm, prefix + n) + prefix * kv_bytes(lm) <= budget  # noqa: E731
    low, high = 1, max(cap, 1)
    if fits(high):
        return high
    while low < high:  # the largest n that fits (at least 1: a pass must hold a row)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def fill(items: Sequence, sizes: Callable, limits: tuple) -> list[list]:
    """Consecutive items in chunks whose summed sizes stay within every limit (sizes(item) -> a tuple
    like limits); an item alone over a limit gets a chunk of its own."""
    out, current, used = [], [], [0] * len(limits)
    for item in items:
        size = sizes(item)
        if current and any(u + s > limit for u, s, limit in zip(used, size, limits)):
            out.append(current)
            current, used = [], [0] * len(limits)
        current.append(item)
        used = [u + s for u, s in zip(used, size)]
    return out + [current] if current else out


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()  # the CPU allocator raises a plain RuntimeError
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def _release(lm) -> None:
    gc.collect()
    if lm.device.startswith("cuda"):
        torch.cuda.empty_cache()


def halving_on_oom(lm, run: Callable[[list], object], chunk: list, what: str) -> list:
    """[run(chunk)]; when the device runs out of memory, [run(first half), run(second half)]; when it
    runs out again (or the chunk is one item), one ExplorerInputError that says what to change."""
    try:
        return [run(chunk)]
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
    _release(lm)
    if len(chunk) > 1:
        half = len(chunk) // 2
        try:
            return [run(chunk[:half]), run(chunk[half:])]
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
        _release(lm)
    limit = os.environ.get(ENV)
    raise ExplorerInputError(
        f"Out of memory on {lm.device} running {what} ({len(chunk)} at once, then half as many): use shorter "
        "prompts, fewer pairs or patches, a lower memory budget (CIRCUIT_EXPLORER_MEMORY_BUDGET_MB"
        f"{', now ' + limit if limit else ''}), or a smaller dtype (bfloat16).") from None
