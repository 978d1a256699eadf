"""Loader details: the model lock under concurrent sessions, devices, dtypes, bad model names, bad
device and dtype choices, and half-precision overflow."""
import threading

import numpy as np
import pytest
import torch

from explorer.core import engine
from explorer.core.errors import ExplorerInputError
from explorer.sources.models import load_model
from explorer.core.runtime import configure_threads, pick_device, pick_dtype
from tests.conftest import TEST_DEVICE, TEST_DTYPE, tol
from tests.device_guard import is_host


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
    expected = [engine.run(demo_model, x).logits for x in ids]
    results = run_concurrently(lambda i: [engine.run(demo_model, ids[i]).logits for _ in range(3)][-1], len(ids))
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


def test_bfloat16_load(tmp_path):
    from explorer.sources.tiny import build_tiny_model
    lm = load_model(str(build_tiny_model("qwen2", tmp_path / "q")), device=TEST_DEVICE, dtype="bfloat16")
    assert lm.torch_model.dtype == torch.bfloat16 and lm.identity.endswith(f"bfloat16|{TEST_DEVICE}")
    out = engine.run(lm, torch.tensor([[3, 4, 5]]), reads=[("resid_post", 0)])
    logits, reads = out.logits, out.reads
    assert logits.dtype == torch.float32 and is_host(logits)  # widened for the metric, on the CPU
    assert reads[("resid_post", 0)].dtype == torch.bfloat16  # reads stay as the model computes them


def test_concurrent_patch_sweeps_share_caches_safely(demo_model):
    """Several sessions sweeping different pairs at once get the numbers a lone session gets."""
    from explorer.core import cache, scheduler
    from explorer.analyses import patching
    from explorer.core.prompts import load_prompt_set, tokenize_pair
    from explorer.core.runtime import REPO_ROOT
    pairs = load_prompt_set(REPO_ROOT / "prompts" / "demo_induction.jsonl").pairs[:6]
    tps = [tokenize_pair(demo_model.tokenizer, p) for p in pairs]
    patches = [[(patching.Cell("resid_pre", l, p),) for l in range(demo_model.arch.n_layers) for p in range(tp.n_pos)]
               for tp in tps]
    alone = [patching.patched_logit_diffs(demo_model, tp, ps, fast=False) for tp, ps in zip(tps, patches)]
    cache.clear_memory()
    got = run_concurrently(lambda i: scheduler.patched_lds(demo_model, tps[i], patches[i], "denoise"), len(tps))
    for a, b in zip(alone, got):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=tol("same"), rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_device_the_machine_lacks_names_what_to_use(capsys):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ExplorerInputError, match="no CUDA GPU is visible; use 'cpu' or 'auto'"):
            load_model("demo", device=device)
    from explorer.surfaces.cli import main
    args = ["baseline", "--model", "demo", "--clean", "Anna", "--corrupted", "Tom", "--clean-answer", "Anna",
            "--corrupted-answer", "Tom"]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU is visible; use 'cpu' or 'auto'" in err[0]
    assert main([*args, "--dtype", "half"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Unknown dtype 'half'; use one of float32, float16, bfloat16, float64" in err[0]


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                    reason="this machine has Apple MPS")
def test_mps_where_there_is_none():
    with pytest.raises(ExplorerInputError, match="Apple MPS is not available; use 'cpu' or 'auto'"):
        pick_device("mps")


def test_dtypes_a_device_cannot_run(monkeypatch):
    with pytest.raises(ExplorerInputError, match="float64 is a CPU-only checking dtype; use float32 on 'mps'"):
        pick_dtype("float64", "mps")
    assert pick_dtype("float64", "cpu") == torch.float64

    def no_half(device, dtype):  # what torch builds without half-precision CPU kernels say
        raise RuntimeError(f'"addmm_impl_cpu_" not implemented for {dtype}')
    monkeypatch.setattr("explorer.core.runtime._probe", no_half)
    with pytest.raises(ExplorerInputError, match=r"dtype float16 does not run on 'cpu' here \(.*not implemented.*\); "
                                                 "use float32, or bfloat16 where the device supports it"):
        load_model("demo", device="cpu", dtype="float16")


@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory):
    """A tiny llama whose last MLP writes values past float16's range (65504), fine in float32."""
    from transformers import AutoModelForCausalLM
    from explorer.sources.tiny import build_tiny_model
    folder = build_tiny_model("llama", tmp_path_factory.mktemp("overflow"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.mul_(1e6)
    model.save_pretrained(folder)
    return folder


def test_float16_overflow_says_to_use_a_wider_dtype(overflowing_model):
    from explorer.analyses.baseline import baseline
    from explorer.analyses.patching import patch_sweep
    from explorer.core.prompts import PromptPair, tokenize_pair
    pair = PromptPair("w3 w7 w11 w5", "w3 w8 w11 w5", "w4", "w6")
    wide = load_model(str(overflowing_model), device=TEST_DEVICE, dtype="float32")
    assert np.isfinite(baseline(wide, pair).ld_clean)
    half = load_model(str(overflowing_model), device=TEST_DEVICE, dtype="float16")
    message = "overflowed to inf/NaN in float16.*load the model in bfloat16 or float32"
    with pytest.raises(ExplorerInputError, match=message):
        baseline(half, pair)
    with pytest.raises(ExplorerInputError, match=message):
        patch_sweep(half, tokenize_pair(half.tokenizer, pair), "resid_post", "last")


def test_a_model_folder_removed_while_the_app_runs(tmp_path):
    """The app keeps a loaded model; if its folder then disappears, reloading or re-hashing it says
    so in one message, and the model already in memory keeps working."""
    import shutil

    from explorer.analyses.baseline import baseline
    from explorer.sources.models import weight_hash
    from explorer.core.prompts import PromptPair, tokenize_pair
    from explorer.sources.tiny import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "vanishing")
    lm = load_model(str(folder), device=TEST_DEVICE, dtype=TEST_DTYPE)
    tp = tokenize_pair(lm.tokenizer, PromptPair("w1 w2 w3", "w1 w4 w3", "w5", "w6"))
    baseline(lm, tp)
    shutil.rmtree(folder)
    with pytest.raises(ExplorerInputError, match="does not exist"):
        load_model(str(folder), device=TEST_DEVICE, dtype=TEST_DTYPE)
    with pytest.raises(ExplorerInputError, match="is gone: it was removed or moved"):
        weight_hash(folder)
    calls = lm.forward_calls
    after = baseline(lm, tokenize_pair(lm.tokenizer, PromptPair("w7 w8 w9", "w7 w10 w9", "w5", "w6")))
    assert lm.forward_calls > calls and np.isfinite(after.ld_clean)  # weights are in memory, not read again


def test_a_model_folder_removed_in_the_middle_of_loading(tmp_path, monkeypatch):
    """The folder checks out when it is resolved, then vanishes before the weights are read."""
    import shutil

    from explorer.sources import models
    from explorer.sources.tiny import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "vanishing")
    resolve = models.resolve_model_path

    def resolve_then_remove(model):
        found = resolve(model)
        shutil.rmtree(folder)
        return found

    monkeypatch.setattr(models, "resolve_model_path", resolve_then_remove)
    with pytest.raises(ExplorerInputError, match="is gone: it was removed or moved"):
        load_model(str(folder), device=TEST_DEVICE, dtype=TEST_DTYPE)


def test_weights_removed_from_a_folder(tmp_path):
    from explorer.sources.models import weight_hash
    from explorer.sources.tiny import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExplorerInputError, match="holds no weight files"):
        weight_hash(folder)
