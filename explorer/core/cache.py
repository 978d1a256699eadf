"""Activation cache: in memory and on disk, keyed by model identity, token ids and sites.

A revisit of the same prompt on the same weights runs no forward pass. Files are
safetensors named by the sha256 of the key, so names never leak prompt text. Each file
carries a sha256 of its contents and is written atomically, so a damaged or half-written
entry is never trusted: it is deleted and recomputed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from explorer.core import engine
from explorer.core.runtime import HOST, cache_dir, to_host

log = logging.getLogger(__name__)

_MEMORY: OrderedDict[str, dict] = OrderedDict()
_MEMO_LOCK = threading.Lock()
MEMORY_ENTRIES = 64

# ---- files: atomic writes, checksummed reads, leftovers of killed writers removed ----
TEMP_SUFFIX = ".tmp"
# A temporary file older than this is a leftover even if its writer's pid is alive again (pid reuse).
STALE_TEMP_SECONDS = 3600
_TEMP_PID = re.compile(r"\.(\d+)\.[^.]*" + re.escape(TEMP_SUFFIX) + "$")
_SWEPT: set[str] = set()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file, no file, or all of the new one.

    The temporary file sits in the same folder because os.replace is atomic only within one
    file system; it is fsynced first so a crash after the rename cannot leave a short file.
    Its name ends in TEMP_SUFFIX and holds the writer's pid, which is how leftovers are found.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself; not possible on Windows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate the process there; fall back on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete temporary files whose writer is gone (killed mid-write) or that are stale.

    A live process's temporary file is kept: the app and a CLI run may share one cache.
    """
    removed = []
    for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
        match = _TEMP_PID.search(tmp.name)
        try:
            stale = time.time() - tmp.stat().st_mtime > STALE_TEMP_SECONDS
            if match is None or stale or not _pid_alive(int(match.group(1))):
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # another process removed or renamed it first
            continue
    return removed


def _folder(name: str) -> Path:
    """A cache subfolder, made on demand; the first use in this process clears leftovers."""
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    with _MEMO_LOCK:
        first = str(folder) not in _SWEPT
        _SWEPT.add(str(folder))
    if first:
        for tmp in remove_leftovers(folder):
            log.info("Removed %s, left behind by an interrupted cache write.", tmp.name)
    return folder


def _layout_digest(blob: bytes) -> tuple[dict, str]:
    """(metadata, sha256) of a safetensors blob. The digest covers the tensor table (names, dtypes,
    shapes, offsets) and the data, not the metadata that stores it, so a flipped byte anywhere
    that matters changes it."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    metadata = header.pop("__metadata__", None) or {}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(memoryview(blob)[8 + n:])
    return metadata, digest.hexdigest()


def _write_entry(path: Path, tensors: dict, save) -> None:
    """Store tensors as a checksummed safetensors file (`save`: safetensors.torch/numpy .save).
    A failed write (disk full, read-only cache) costs a recompute later, not the result now."""
    _, digest = _layout_digest(save(tensors))
    try:
        write_atomic(path, save(tensors, metadata={"sha256": digest}))
    except OSError as exc:
        log.warning("Could not write cache entry %s (%s); continuing without it.", path.name, exc)


def _read_entry(path: Path, load) -> dict | None:
    """The tensors of a cache file, or None when it is absent or damaged. A damaged file (unreadable,
    truncated, altered, not safetensors, no checksum) is deleted with a warning so it is recomputed."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        problem = f"unreadable ({exc})"
    else:
        try:
            metadata, digest = _layout_digest(blob)
            if metadata.get("sha256") == digest:
                return load(blob)
            problem = "checksum mismatch (truncated or altered)" if "sha256" in metadata else "no checksum"
        except Exception as exc:  # any parse failure of these bytes means the file is damaged
            problem = f"not a valid entry ({type(exc).__name__}: {str(exc)[:120]})"
    log.warning("Discarded cache entry %s: %s; it will be recomputed.", path, problem)
    with contextlib.suppress(OSError):
        path.unlink()
    return None


# ---- activations ----
def cache_key(lm, token_ids, reads) -> str:
    payload = json.dumps({"model": lm.identity, "ids": list(map(int, token_ids)),
                          "reads": sorted([list(r) for r in reads])})
    return hashlib.sha256(payload.encode()).hexdigest()


def _disk_path(key: str) -> Path:
    return _folder("activations") / f"{key}.safetensors"


def get_activations(lm, token_ids, reads: list[tuple[str, int]], use_disk: bool = True) -> tuple[torch.Tensor, dict]:
    """(last-position logits [vocab], {(site, layer): tensor without the batch dim}) for one prompt,
    on the CPU in float32 whatever the model's device and dtype."""
    import safetensors.torch

    reads = sorted(set(reads))
    key = cache_key(lm, token_ids, reads)
    with _MEMO_LOCK:  # Streamlit sessions share these dicts from several threads
        hit = _MEMORY.get(key)
        if hit is not None:
            _MEMORY.move_to_end(key)
            return hit["logits"], hit["acts"]
    path = _disk_path(key) if use_disk else None
    flat = _read_entry(path, safetensors.torch.load) if path is not None else None
    if flat is not None:
        acts = {(k.split(":")[0], int(k.split(":")[1])): to_host(v) for k, v in flat.items() if k != "logits"}
        entry = {"logits": to_host(flat["logits"]), "acts": acts}
    else:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=HOST)
        out = engine.run(lm, ids, reads=reads)
        logits, saved = out.logits, out.reads
        acts = {k: to_host(v[0]).contiguous() for k, v in saved.items()}
        entry = {"logits": logits[0], "acts": acts}
        if path is not None:
            flat = {f"{s}:{l}": t for (s, l), t in acts.items()}
            flat["logits"] = entry["logits"].contiguous()
            _write_entry(path, flat, safetensors.torch.save)
    with _MEMO_LOCK:
        _MEMORY[key] = entry
        while len(_MEMORY) > MEMORY_ENTRIES:
            _MEMORY.popitem(last=False)
    return entry["logits"], entry["acts"]


def clear_memory() -> None:
    with _MEMO_LOCK:
        _MEMORY.clear()
        _RESULTS.clear()


# ---- results: arrays of numbers computed from a pair and a spec, cached the same way ----
_RESULTS: OrderedDict = OrderedDict()


def result_key(lm, tp, spec, direction: str) -> str:
    payload = json.dumps({"model": lm.identity, "clean": list(tp.clean_ids), "corrupted": list(tp.corrupted_ids),
                          "answers": [tp.clean_answer_id, tp.corrupted_answer_id], "direction": direction,
                          "spec": repr(spec)})
    return hashlib.sha256(payload.encode()).hexdigest()


def _result_path(key: str) -> Path:
    return _folder("results") / f"{key}.safetensors"


def load_result(key: str):
    import safetensors.numpy

    with _MEMO_LOCK:
        hit = _RESULTS.get(key)
        if hit is not None:
            _RESULTS.move_to_end(key)
            return hit.copy()
    stored = _read_entry(_result_path(key), safetensors.numpy.load)
    if stored is None or "values" not in stored:
        return None
    with _MEMO_LOCK:
        _RESULTS[key] = stored["values"]
    return stored["values"].copy()


def save_result(key: str, values) -> None:
    import numpy as np
    import safetensors.numpy

    values = np.ascontiguousarray(values)
    _write_entry(_result_path(key), {"values": values}, safetensors.numpy.save)
    with _MEMO_LOCK:
        _RESULTS[key] = values.copy()
        while len(_RESULTS) > 256:
            _RESULTS.popitem(last=False)
