"""Activation cache: in memory and on disk, keyed by model identity, token ids and sites.

A revisit of the same prompt on the same weights runs no forward pass. Files are
safetensors named by the sha256 of the key, so names never leak prompt text.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

import torch

from explorer import engine
from explorer.runtime import HOST, cache_dir, to_host

_MEMORY: OrderedDict[str, dict] = OrderedDict()
_MEMO_LOCK = threading.Lock()
MEMORY_ENTRIES = 64


def cache_key(lm, token_ids, reads) -> str:
    payload = json.dumps({"model": lm.identity, "ids": list(map(int, token_ids)),
                          "reads": sorted([list(r) for r in reads])})
    return hashlib.sha256(payload.encode()).hexdigest()


def _disk_path(key: str):
    folder = cache_dir() / "activations"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.safetensors"


def get_activations(lm, token_ids, reads: list[tuple[str, int]], use_disk: bool = True) -> tuple[torch.Tensor, dict]:
    """(last-position logits [vocab], {(site, layer): tensor without the batch dim}) for one prompt,
    on the CPU in float32 whatever the model's device and dtype."""
    from safetensors.torch import load_file, save_file

    reads = sorted(set(reads))
    key = cache_key(lm, token_ids, reads)
    with _MEMO_LOCK:  # Streamlit sessions share these dicts from several threads
        hit = _MEMORY.get(key)
        if hit is not None:
            _MEMORY.move_to_end(key)
            return hit["logits"], hit["acts"]
    path = _disk_path(key) if use_disk else None
    if path is not None and path.is_file():
        flat = load_file(str(path))
        acts = {(k.split(":")[0], int(k.split(":")[1])): to_host(v) for k, v in flat.items() if k != "logits"}
        entry = {"logits": to_host(flat["logits"]), "acts": acts}
    else:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=HOST)
        logits, saved = engine.run(lm, ids, reads=reads)
        acts = {k: to_host(v[0]).contiguous() for k, v in saved.items()}
        entry = {"logits": logits[0], "acts": acts}
        if path is not None:
            flat = {f"{s}:{l}": t for (s, l), t in acts.items()}
            flat["logits"] = entry["logits"].contiguous()
            save_file(flat, str(path))
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


def load_result(key: str):
    import numpy as np

    with _MEMO_LOCK:
        hit = _RESULTS.get(key)
        if hit is not None:
            _RESULTS.move_to_end(key)
            return hit.copy()
    path = cache_dir() / "results" / f"{key}.npy"
    if path.is_file():
        arr = np.load(path, allow_pickle=False)
        with _MEMO_LOCK:
            _RESULTS[key] = arr
        return arr.copy()
    return None


def save_result(key: str, values) -> None:
    import numpy as np

    folder = cache_dir() / "results"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{key}.npy", np.asarray(values), allow_pickle=False)
    with _MEMO_LOCK:
        _RESULTS[key] = np.asarray(values).copy()
        while len(_RESULTS) > 256:
            _RESULTS.popitem(last=False)
