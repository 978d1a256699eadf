"""Cache faults: atomic, checksummed entries; damaged entries discarded and recomputed; a writer
killed mid-sweep leaves nothing half-written that is ever read."""
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer.core import cache
from explorer.core.prompts import PromptPair, tokenize_pair
from tests.conftest import ROOT

IDS = [3, 10, 20, 30, 7]
READS = [("resid_post", 0), ("attn_out", 1), ("mlp_out", 1)]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder and empty in-memory caches for one test."""
    monkeypatch.setenv("CIRCUIT_EXPLORER_CACHE", str(tmp_path))
    cache.clear_memory()
    yield tmp_path
    cache.clear_memory()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor: the file still parses, only the checksum can tell
    path.write_bytes(bytes(data))


def _flip_header_byte(path: Path) -> None:
    # A tensor's name in the header: "resid_post:0" -> "resid_posu:0" still parses as safetensors.
    data = path.read_bytes()
    at = data.index(b"resid_post:0") + len("resid_pos")
    path.write_bytes(data[:at] + b"u" + data[at + 1:])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(1000))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _no_checksum(path: Path) -> None:
    # A well-formed safetensors file without our checksum (e.g. written by an older version).
    from safetensors.torch import load, save
    path.write_bytes(save(load(path.read_bytes())))


DAMAGE = {"truncated": _truncate, "data byte flipped": _flip_data_byte, "header byte flipped": _flip_header_byte,
          "garbage": _garbage, "empty": _empty, "no checksum": _no_checksum}


def _entry_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")


def test_entries_carry_a_checksum_and_no_temporary_file_remains(fresh_cache, tiny_model):
    from safetensors import safe_open

    cache.get_activations(tiny_model("llama"), IDS, READS)
    cache.save_result("ab" * 32, np.arange(5.0))
    for sub in ("activations", "results"):
        files = list((fresh_cache / sub).iterdir())
        assert len(files) == 1 and files[0].suffix == ".safetensors", files
        with safe_open(str(files[0]), "pt") as fh:
            assert len(fh.metadata()["sha256"]) == 64


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_activation_entry_is_discarded_and_recomputed(fresh_cache, tiny_model, caplog, damage):
    lm = tiny_model("llama")
    cache.get_activations(lm, IDS, READS)
    cache.clear_memory()
    fresh_logits, fresh_acts = cache.get_activations(lm, IDS, READS, use_disk=False)  # a run that never reads disk
    cache.clear_memory()
    (path,) = _entry_files(fresh_cache / "activations")
    DAMAGE[damage](path)

    before = lm.forward_calls
    with caplog.at_level(logging.WARNING, logger="explorer.core.cache"):
        logits, acts = cache.get_activations(lm, IDS, READS)
    assert lm.forward_calls == before + 1, "a damaged entry must be recomputed, not read"
    assert any("Discarded cache entry" in r.getMessage() and path.name in r.getMessage() for r in caplog.records)
    assert set(acts) == set(fresh_acts)
    torch.testing.assert_close(logits, fresh_logits, rtol=0, atol=0)
    for k in fresh_acts:
        torch.testing.assert_close(acts[k], fresh_acts[k], rtol=0, atol=0)

    # The damaged file was replaced by a valid entry that the next visit reads without a forward pass.
    cache.clear_memory()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="explorer.core.cache"):
        again_logits, _ = cache.get_activations(lm, IDS, READS)
    assert lm.forward_calls == before + 1 and not caplog.records
    torch.testing.assert_close(again_logits, fresh_logits, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated", "data byte flipped", "garbage", "empty"])
def test_damaged_result_entry_is_discarded_and_the_sweep_recomputed(fresh_cache, tiny_model, caplog, damage):
    from explorer.analyses.patching import patch_sweep

    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PromptPair("w1 w2 w3 w4", "w1 w5 w3 w4", "w6", "w7"))
    first = patch_sweep(lm, tp, "resid_post", positions="each").frame
    (path,) = _entry_files(fresh_cache / "results")
    DAMAGE[damage](path)
    cache.clear_memory()

    before = lm.forward_calls
    with caplog.at_level(logging.WARNING, logger="explorer.core.cache"):
        again = patch_sweep(lm, tp, "resid_post", positions="each").frame
    assert lm.forward_calls > before
    assert any("Discarded cache entry" in r.getMessage() for r in caplog.records)
    assert again["ld_patched"].tolist() == first["ld_patched"].tolist()
    assert cache.load_result(path.stem) is not None  # rewritten, valid


def test_unreadable_or_missing_entries(fresh_cache, caplog):
    assert cache.load_result("0" * 64) is None  # absent: no warning, nothing to discard
    assert not caplog.records
    folder = fresh_cache / "results"
    (folder / ("1" * 64 + ".safetensors")).mkdir(parents=True)  # a path that cannot be read as a file
    with caplog.at_level(logging.WARNING, logger="explorer.core.cache"):
        assert cache.load_result("1" * 64) is None
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_failed_write_leaves_no_file_and_keeps_the_result(fresh_cache, monkeypatch, caplog):
    def fail_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "replace", fail_replace)
    with caplog.at_level(logging.WARNING, logger="explorer.core.cache"):
        cache.save_result("c" * 64, np.arange(4.0))
    monkeypatch.undo()
    assert list((fresh_cache / "results").iterdir()) == []  # the temporary file was removed too
    assert any("Could not write cache entry" in r.getMessage() for r in caplog.records)
    assert cache.load_result("c" * 64).tolist() == [0.0, 1.0, 2.0, 3.0]  # still served from memory


def test_temporary_files_are_never_read_and_only_dead_writers_leftovers_are_removed(fresh_cache):
    import safetensors.numpy

    folder = fresh_cache / "results"
    folder.mkdir()
    key = "d" * 64
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # Well-formed entries under temporary names: one from a killed writer, one from a live one.
    payload = safetensors.numpy.save({"values": np.arange(3.0)})
    dead_tmp = folder / f".{key}.safetensors.{dead.pid}.x1y2{cache.TEMP_SUFFIX}"
    live_tmp = folder / f".{key}.safetensors.{os.getpid()}.a1b2{cache.TEMP_SUFFIX}"
    odd_tmp = folder / f".{key}.safetensors{cache.TEMP_SUFFIX}"  # no pid: not ours to keep
    for tmp in (dead_tmp, live_tmp, odd_tmp):
        tmp.write_bytes(payload)
    assert cache.load_result(key) is None  # the first use of the folder also sweeps it
    assert not dead_tmp.exists() and not odd_tmp.exists()
    assert live_tmp.exists()  # another process (here: this one) may still be writing it
    old = time.time() - cache.STALE_TEMP_SECONDS - 60
    os.utime(live_tmp, (old, old))
    assert cache.remove_leftovers(folder) == [live_tmp]  # stale: its pid may have been reused


WRITER = """
import sys
import numpy as np
from explorer.core import cache
for i in range(10_000):
    cache.save_result(f"{i:064x}", np.random.default_rng(i).standard_normal(1_000_000))
    print(i, flush=True)
"""


def _expected(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(1_000_000)


def _kill_mid_write(folder: Path) -> bool:
    """Run WRITER against `folder`, SIGKILL it while a cache write is in flight (after 4 whole
    entries); True if a partly written temporary file was left behind."""
    env = dict(os.environ, CIRCUIT_EXPLORER_CACHE=str(folder), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", WRITER], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        written = 0
        while written < 4:
            line = proc.stdout.readline()
            assert line, "the writer stopped before it was killed"
            written = int(line) + 1
        results = folder / "results"
        deadline = time.time() + 30
        while time.time() < deadline and not any(e.name.endswith(cache.TEMP_SUFFIX) for e in os.scandir(results)):
            pass  # a busy wait: the kill should land while the next entry is being written
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return any((folder / "results").glob(f".*{cache.TEMP_SUFFIX}"))


def test_killed_sweep_leaves_only_complete_entries(fresh_cache, caplog):
    """SIGKILL a process in the middle of a stream of 8 MB cache writes: every entry file is whole
    and valid or absent, the partial temporary file is never read, and the next start removes it."""
    for attempt in range(3):  # the rename can win the race with the kill; then try again
        folder = fresh_cache / f"attempt{attempt}"
        if _kill_mid_write(folder):
            break
    else:
        pytest.fail("no kill landed inside a write in 3 attempts")
    os.environ["CIRCUIT_EXPLORER_CACHE"] = str(folder)  # fresh_cache's monkeypatch restores it

    results = folder / "results"
    entries = _entry_files(results)
    leftovers = list(results.glob(f".*{cache.TEMP_SUFFIX}"))
    assert {p.name for p in results.iterdir()} == {p.name for p in entries + leftovers}
    assert len(entries) >= 4
    partial = leftovers[0].stat().st_size
    cache.clear_memory()
    with caplog.at_level(logging.WARNING, logger="explorer.core.cache"):
        for path in entries:
            np.testing.assert_array_equal(cache.load_result(path.stem), _expected(int(path.stem, 16)))
        # The key being written when the process died has no entry: absent, so it is computed again.
        assert cache.load_result(f"{len(entries):064x}") is None
    assert not caplog.records, "no entry may be damaged"
    assert not list(results.glob(f".*{cache.TEMP_SUFFIX}")), f"a {partial}-byte leftover was not cleaned up"
