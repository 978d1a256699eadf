"""The memory budget: passes split to fit it with unchanged numbers, and out-of-memory halving."""
import numpy as np
import pandas as pd
import pytest
import torch

from explorer.core import budget, engine, scheduler
from explorer.analyses.ablation import ablate_set, parse_targets
from explorer.analyses.attribution import attribution_patching
from explorer.core.errors import ExplorerInputError
from explorer.analyses.patching import LAST, Cell
from explorer.core.prompts import PromptPair, tokenize_pair
from tests.conftest import tol

PAIR = PromptPair("w3 w7 w11 w5 w9 w2", "w3 w8 w11 w5 w9 w2", "w4", "w6")
TINY_MB = 0.02  # 20 kB: a handful of tokens per pass on the tiny models


def _sweep(lm, tp):
    patches = [(Cell(site, l, p),) for site in ("resid_pre", "mlp_out") for l in range(lm.arch.n_layers)
               for p in range(tp.n_pos)]
    patches += [(Cell("head_out", l, None, h),) for l in range(lm.arch.n_layers) for h in range(lm.arch.n_heads)]
    return patches + [(Cell("attn_out", 1, LAST),)]


def _passes(monkeypatch) -> list[tuple[int, int]]:
    """Record (batch rows, tokens) of every traced pass."""
    seen, run = [], engine.run

    def counting(lm, input_ids, *args, **kwargs):
        seen.append((int(input_ids.shape[0]), int(input_ids.numel())))
        return run(lm, input_ids, *args, **kwargs)
    monkeypatch.setattr(engine, "run", counting)
    return seen


@pytest.mark.parametrize("one_pass", [False, True])
def test_a_tiny_budget_gives_many_passes_and_the_same_numbers(tiny_model, monkeypatch, one_pass):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    patches = _sweep(lm, tp)
    whole = scheduler.patched_lds(lm, tp, patches, "denoise", one_pass=one_pass)
    scheduler.clear_memo()
    passes = _passes(monkeypatch)
    split = scheduler.patched_lds(lm, tp, patches, "denoise", one_pass=one_pass, memory_budget_mb=TINY_MB)
    assert len(passes) > 10
    np.testing.assert_allclose(split, whole, atol=tol("same"))


def test_the_budget_comes_from_the_argument_the_environment_or_free_memory(tiny_model, monkeypatch):
    lm = tiny_model("llama")
    assert budget.budget_bytes(lm, 3) == 3 * 2**20
    monkeypatch.setenv(budget.ENV, "5")
    assert budget.budget_bytes(lm) == 5 * 2**20 and budget.budget_bytes(lm, 2) == 2 * 2**20
    monkeypatch.delenv(budget.ENV)
    assert 0 < budget.budget_bytes(lm) < budget._free_bytes("cpu")
    with pytest.raises(ExplorerInputError, match="positive"):
        budget.budget_bytes(lm, 0)


def test_a_long_prompt_under_a_small_budget_keeps_every_pass_bounded(tiny_model, monkeypatch):
    """512 tokens: the rows' own tokens and their copies of the cached prefix stay within the budget."""
    lm = tiny_model("qwen2")
    words = [f"w{3 + i % 40}" for i in range(512)]
    corrupted = list(words)
    corrupted[20] = "w50"
    tp = tokenize_pair(lm.tokenizer, PromptPair(" ".join(words), " ".join(corrupted), "w4", "w6"))
    assert tp.n_pos == 512
    patches = [(Cell("resid_pre", l, None),) for l in range(lm.arch.n_layers)]
    patches += [(Cell("head_out", l, None, h),) for l in range(lm.arch.n_layers) for h in range(lm.arch.n_heads)]
    memory_mb = 40
    memory = memory_mb * 2**20
    row = 492 * budget.token_bytes(lm, 512) + 20 * budget.kv_bytes(lm)  # a row starting at position 20
    assert memory // row < 8 < scheduler.TOKEN_BUDGET // 492  # the budget, not the token cap, binds
    passes = _passes(monkeypatch)
    scheduler.patched_lds(lm, tp, patches, "denoise", one_pass=False, memory_budget_mb=memory_mb)
    patched = passes[1:]  # the first pass runs both prompts once
    assert len(patched) >= len(patches) / (memory // row)
    assert all(rows <= memory // row for rows, _ in patched)


def test_ablation_over_a_prompt_set_splits_its_passes_to_the_budget(tiny_model, monkeypatch):
    lm = tiny_model("llama")
    pairs = [PromptPair(f"w3 w{7 + i} w11 w5", "w3 w8 w11 w5", "w4", "w6", id=str(i),
                        category="headline" if i < 6 else "control") for i in range(9)]
    targets = parse_targets("attn1, L0H1", lm.arch)
    whole = ablate_set(lm, pairs, targets, "zero", n_random=2, n_boot=50)
    passes = _passes(monkeypatch)
    split = ablate_set(lm, pairs, targets, "zero", n_random=2, n_boot=50, memory_budget_mb=TINY_MB)
    fits = budget.rows_per_pass(lm, 4, int(TINY_MB * 2**20), 64)
    assert fits < len(pairs) and max(rows for rows, _ in passes) <= fits
    assert len(passes) >= 2 * np.ceil(len(pairs) / fits)  # both runs of every pair
    pd.testing.assert_frame_equal(split.per_pair, whole.per_pair, atol=tol("same"))


def test_attribution_splits_its_gradients_into_layer_groups(tiny_model, monkeypatch):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    whole = attribution_patching(lm, tp)
    calls = lm.forward_calls
    split = attribution_patching(lm, tp, memory_budget_mb=TINY_MB)
    assert lm.forward_calls - calls == lm.arch.n_layers  # one group per layer
    pd.testing.assert_frame_equal(split.frame, whole.frame, atol=tol("same"))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB")])
def test_out_of_memory_halves_the_pass_once_then_says_what_to_change(tiny_model, monkeypatch, error):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    patches = [(Cell("resid_pre", l, p),) for l in range(lm.arch.n_layers) for p in range(tp.n_pos)]
    want = scheduler.patched_lds(lm, tp, patches, "noise", one_pass=False)
    scheduler.clear_memo()
    run, failures, passes = engine.run, [], []

    def fails_once(lm, input_ids, *args, **kwargs):  # the device runs out of memory on the first patched pass
        if not failures and args:
            failures.append(int(input_ids.numel()))
            raise error
        passes.append(int(input_ids.numel()))
        return run(lm, input_ids, *args, **kwargs)
    monkeypatch.setattr(engine, "run", fails_once)
    got = scheduler.patched_lds(lm, tp, patches, "noise", one_pass=False)
    assert failures and min(passes[1:]) < failures[0]  # the failed pass was retried in smaller pieces
    np.testing.assert_allclose(got, want, atol=tol("same"))

    def always_fails(lm, input_ids, *args, **kwargs):
        raise error
    monkeypatch.setattr(engine, "run", always_fails)
    with pytest.raises(ExplorerInputError) as info:
        scheduler.patched_lds(lm, tp, patches, "noise", one_pass=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("Out of memory on cpu")
    for advice in ("shorter prompts", "fewer pairs", "CIRCUIT_EXPLORER_MEMORY_BUDGET_MB", "bfloat16"):
        assert advice in message


def test_errors_that_are_not_out_of_memory_pass_through(tiny_model, monkeypatch):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(scheduler, "_run_pass", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        scheduler.patched_lds(lm, tp, [(Cell("resid_pre", 1, 3),)], "denoise", one_pass=False)
