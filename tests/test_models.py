"""Loader details: the model lock under concurrent sessions, devices, dtypes, bad model names."""
import threading

import pytest
import torch

from explorer import engine
from explorer.errors import ExplorerInputError
from explorer.models import load_model
from explorer.runtime import configure_threads, pick_device, pick_dtype


def run_concurrently(task, n: int) -> list:
    """task(i) for i < n, each in its own thread at once; returns the results, raises the first error."""
    results, errors = [None] * n, []

    def work(i):
        try:
            results[i] = task(i)
        except Exception as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_concurrent_traces_through_the_lock(demo_model):
    """Streamlit serves sessions from threads; traces on the shared model must not collide."""
    ids = [torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    expected = [engine.run(demo_model, x)[0] for x in ids]
    results = run_concurrently(lambda i: [engine.run(demo_model, ids[i])[0] for _ in range(3)][-1], len(ids))
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want)


def test_device_dtype_and_threads_settings():
    assert pick_device("auto") in ("cpu", "cuda", "mps")
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ExplorerInputError, match="Unknown device"):
        pick_device("tpu")
    assert pick_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ExplorerInputError, match="Unknown dtype"):
        pick_dtype("float8")
    assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(ExplorerInputError):
        configure_threads(0)


def test_bad_model_names(tmp_path):
    with pytest.raises(ExplorerInputError, match="does not exist"):
        load_model("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExplorerInputError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_trust_remote_code_is_off_by_default(tiny_model):
    lm = tiny_model("llama")
    assert lm.torch_model.config.to_dict().get("trust_remote_code") in (None, False)


def test_bfloat16_load(tiny_model, tmp_path):
    from explorer.tiny import build_tiny_model
    lm = load_model(str(build_tiny_model("qwen2", tmp_path / "q")), dtype="bfloat16")
    assert lm.torch_model.dtype == torch.bfloat16 and lm.identity.endswith("bfloat16|cpu")
    logits, _ = engine.run(lm, torch.tensor([[3, 4, 5]]))
    assert logits.dtype == torch.float32


def test_concurrent_patch_sweeps_share_caches_safely(demo_model):
    """Several sessions sweeping different pairs at once get the numbers a lone session gets."""
    from explorer import cache, patching
    from explorer.prompts import load_prompt_set, tokenize_pair
    from explorer.runtime import REPO_ROOT
    pairs = load_prompt_set(REPO_ROOT / "prompts" / "demo_induction.jsonl").pairs[:6]
    tps = [tokenize_pair(demo_model.tokenizer, p) for p in pairs]
    patches = [[(patching.Cell("resid_pre", l, p),) for l in range(demo_model.arch.n_layers) for p in range(tp.n_pos)]
               for tp in tps]
    alone = [patching.patched_logit_diffs(demo_model, tp, ps, fast=False) for tp, ps in zip(tps, patches)]
    cache.clear_memory()
    got = run_concurrently(lambda i: patching._fast_lds(demo_model, tps[i], patches[i], "denoise"), len(tps))
    for a, b in zip(alone, got):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=0)
