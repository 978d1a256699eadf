"""Patching checked against an independent plain-torch forward-hook implementation."""
import numpy as np
import pytest
import torch

from explorer.core import scheduler
from explorer.analyses.baseline import pair_lds
from explorer.core.errors import ExplorerInputError
from explorer.analyses.patching import LAST, Cell, head_set_patch, head_sweep, patch_sweep, patched_logit_diffs
from explorer.core.prompts import PromptPair, tokenize_pair
from tests.conftest import load_test_model, model_ids, tol

PAIR = PromptPair(clean="w3 w7 w11 w5 w9 w2", corrupted="w3 w8 w11 w5 w9 w2", clean_answer="w4", corrupted_answer="w6")


def _first(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def hook_patch_ld(lm, src_ids, tgt_ids, site, layer, pos, head, clean_id, corr_id):
    """Reference: capture the source activation with a hook, then overwrite it in the target run (on the
    model's device)."""
    model, sites = lm.torch_model, lm.sites
    n_heads = lm.arch.heads_in(layer)
    module = {"resid_pre": sites.layer, "resid_post": sites.layer, "attn_out": sites.mixer,
              "mlp_out": sites.mlp, "head_out": sites.o_proj}[site](model, layer)
    uses_input = site in ("resid_pre", "head_out")
    store = {}

    def capture(mod, args, kwargs, output=None):
        x = _first(args, kwargs) if uses_input else (output[0] if isinstance(output, tuple) else output)
        store["src"] = x.detach().clone()

    def overwrite(x):
        x = x.clone()
        sel = slice(None) if pos is None else pos
        if head is None:
            x[:, sel] = store["src"][:, sel]
        else:
            v = x.view(*x.shape[:2], n_heads, -1)
            v[:, sel, head] = store["src"].view(*x.shape[:2], n_heads, -1)[:, sel, head]
        return x

    def pre(mod, args, kwargs):
        if args:
            return (overwrite(args[0]),) + args[1:], kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: overwrite(kwargs[key])}

    def post(mod, args, kwargs, output):
        if isinstance(output, tuple):
            return (overwrite(output[0]),) + output[1:]
        return overwrite(output)

    with torch.no_grad():
        if uses_input:
            h = module.register_forward_pre_hook(lambda m, a, k: capture(m, a, k), with_kwargs=True)
        else:
            h = module.register_forward_hook(capture, with_kwargs=True)
        model(model_ids(lm, src_ids))
        h.remove()
        h = module.register_forward_pre_hook(pre, with_kwargs=True) if uses_input else module.register_forward_hook(post, with_kwargs=True)
        logits = model(model_ids(lm, tgt_ids)).logits[0, -1]
        h.remove()
    return float(logits[clean_id] - logits[corr_id])


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_5", "gemma2"])
@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_layer_position_sweep_matches_hooks(tiny_model, family, site):
    lm = tiny_model(family)
    tp = tokenize_pair(lm.tokenizer, PAIR)
    res = patch_sweep(lm, tp, site, "each", "denoise")
    assert len(res.frame) == lm.arch.n_layers * tp.n_pos
    for row in res.frame.itertuples():
        ref = hook_patch_ld(lm, tp.clean_ids, tp.corrupted_ids, site, row.layer, row.pos, None,
                            tp.clean_answer_id, tp.corrupted_answer_id)
        assert row.ld_patched == pytest.approx(ref, abs=tol("ref"))
    # noise direction on a couple of cells
    res = patch_sweep(lm, tp, site, "all", "noise")
    for row in res.frame.itertuples():
        ref = hook_patch_ld(lm, tp.corrupted_ids, tp.clean_ids, site, row.layer, None, None,
                            tp.clean_answer_id, tp.corrupted_answer_id)
        assert row.ld_patched == pytest.approx(ref, abs=tol("ref"))
        assert row.damage == pytest.approx((res.ld_clean - ref) / (res.ld_clean - res.ld_corrupted), abs=tol("ref"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", "qwen3_5"])
def test_head_sweeps_match_hooks(tiny_model, family):
    lm = tiny_model(family)
    tp = tokenize_pair(lm.tokenizer, PAIR)
    for positions in ("all", "each"):
        res = head_sweep(lm, tp, positions, "denoise")
        for row in res.frame.itertuples():
            pos = None if positions == "all" else row.pos
            ref = hook_patch_ld(lm, tp.clean_ids, tp.corrupted_ids, "head_out", row.layer, pos, row.head,
                                tp.clean_answer_id, tp.corrupted_answer_id)
            assert row.ld_patched == pytest.approx(ref, abs=tol("ref"))


def test_identities(tiny_model):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    last_layer = lm.arch.n_layers - 1
    res = patch_sweep(lm, tp, "resid_post", "last", "denoise", layers=[last_layer])
    assert res.frame["recovery"].iloc[0] == pytest.approx(1.0, abs=tol("check"))
    res = patch_sweep(lm, tp, "resid_post", "last", "noise", layers=[last_layer])
    assert res.frame["damage"].iloc[0] == pytest.approx(1.0, abs=tol("check"))
    lds = patched_logit_diffs(lm, tp, [()], "denoise")  # patching nothing
    assert lds[0] == pytest.approx(res.ld_corrupted, abs=tol("same", fp32=1e-6))
    # All heads of a layer together equal the attention output of that layer (o_proj is linear).
    heads = [(0, h) for h in range(lm.arch.n_heads)]
    joint = head_set_patch(lm, tp, heads, "all")
    attn = patch_sweep(lm, tp, "attn_out", "all", layers=[0])
    assert joint.joint_effect == pytest.approx(attn.frame["recovery"].iloc[0], abs=tol("check"))
    assert joint.superadditivity == pytest.approx(joint.joint_effect - joint.singles.frame["recovery"].sum())


def test_differing_positions_flagged_and_titles(tiny_model):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    res = patch_sweep(lm, tp, "mlp_out", "each")
    assert set(res.frame.loc[res.frame["differs"], "pos"]) == {1}
    assert "mlp_out" in res.title and "each position" in res.title and "denoise" in res.title and "recovery" in res.title
    # Layer-0 residual at the differing position carries the whole input difference.
    res0 = patch_sweep(lm, tp, "resid_pre", "each", layers=[0])
    assert res0.frame.loc[res0.frame["pos"] == 1, "recovery"].iloc[0] == pytest.approx(1.0, abs=tol("check"))
    assert not res0.artefact_cells().empty


def test_unequal_lengths_allow_last_position_only(tiny_model):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PromptPair("w3 w7 w11 w5", "w3 w8 w5", "w4", "w6"))
    with pytest.raises(ExplorerInputError, match="same number of tokens"):
        patch_sweep(lm, tp, "resid_post", "each")
    res = patch_sweep(lm, tp, "resid_post", "last", layers=[lm.arch.n_layers - 1])
    ref = hook_patch_ld_last(lm, tp)
    assert res.frame["ld_patched"].iloc[0] == pytest.approx(ref, abs=tol("ref"))


def hook_patch_ld_last(lm, tp):
    model = lm.torch_model
    layer = lm.arch.n_layers - 1
    with torch.no_grad():
        out = {}
        h = lm.sites.layer(model, layer).register_forward_hook(lambda m, a, o: out.__setitem__("x", o.clone()))
        model(model_ids(lm, tp.clean_ids))
        h.remove()

        def post(m, a, o):
            o = o.clone()
            o[:, -1] = out["x"][:, -1]
            return o
        h = lm.sites.layer(model, layer).register_forward_hook(post)
        logits = model(model_ids(lm, tp.corrupted_ids)).logits[0, -1]
        h.remove()
    return float(logits[tp.clean_answer_id] - logits[tp.corrupted_answer_id])


def test_bad_inputs(tiny_model):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    with pytest.raises(ExplorerInputError, match="Layer 9"):
        patch_sweep(lm, tp, "resid_post", layers=[9])
    with pytest.raises(ExplorerInputError, match="Unknown site"):
        patch_sweep(lm, tp, "resid_middle")
    with pytest.raises(ExplorerInputError, match="Head 7"):
        patched_logit_diffs(lm, tp, [(Cell("head_out", 0, None, 7),)])
    with pytest.raises(ExplorerInputError, match="denoise"):
        patch_sweep(lm, tp, "resid_post", direction="sideways")


def test_chunking_gives_same_numbers(tiny_model, monkeypatch):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    full = patch_sweep(lm, tp, "resid_post", "each").frame["ld_patched"].to_numpy()
    monkeypatch.setattr(scheduler, "TOKEN_BUDGET", 13)
    chunked = patch_sweep(lm, tp, "resid_post", "each").frame["ld_patched"].to_numpy()
    np.testing.assert_allclose(full, chunked, atol=tol("same", fp32=1e-5))


FAST_FAMILIES = ["llama", "gpt2", "gpt_neox", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "qwen3_5"]


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_path_equals_full_batched_path(tiny_model, family, trim, one_pass, monkeypatch):
    """Layer skipping, packed rows over the target's key/value prefix, the single pass that carries
    source and target runs beside the patched rows, and skipping unchanged patches change no number
    (small blocks and passes: many of them)."""
    import explorer.analyses.patching as patching
    monkeypatch.setattr(scheduler, "LAYER_BLOCK", 1)
    monkeypatch.setattr(scheduler, "PACK_TOKENS", 9)
    lm = tiny_model(family)
    tp = tokenize_pair(lm.tokenizer, PAIR)
    patches = [(Cell(site, l, p),) for site in ("resid_pre", "resid_post", "attn_out", "mlp_out")
               for l in range(lm.arch.n_layers) for p in range(tp.n_pos)]
    patches += [(Cell("head_out", l, p, h),) for l in range(lm.arch.n_layers) for p in (1, 5) for h in (0, 1)]
    patches += [(Cell("resid_pre", 1, LAST),), (Cell("head_out", 0, LAST, 2),)]
    patches += [(Cell("head_out", l, None, h),) for l in range(lm.arch.n_layers) for h in (0, 3)]
    patches += [(Cell("mlp_out", l, None),) for l in range(lm.arch.n_layers)]
    fast = scheduler.patched_lds(lm, tp, patches, "noise", trim=trim, one_pass=one_pass)
    from explorer.core import cache
    cache.clear_memory()
    import shutil
    shutil.rmtree(cache.cache_dir() / "results", ignore_errors=True)
    slow = patching.patched_logit_diffs(lm, tp, patches, "noise", fast=False)
    np.testing.assert_allclose(fast, slow, atol=tol("same"))


def test_demo_model_sweeps_match_hooks(demo_model):
    from explorer.surfaces.ui.state import DEMO_PAIR
    tp = tokenize_pair(demo_model.tokenizer, DEMO_PAIR)
    res = patch_sweep(demo_model, tp, "resid_post", "each", layers=[1])
    heads = head_sweep(demo_model, tp, "all", "noise", layers=[2])
    for row in res.frame.itertuples():
        ref = hook_patch_ld(demo_model, tp.clean_ids, tp.corrupted_ids, "resid_post", 1, row.pos, None,
                            tp.clean_answer_id, tp.corrupted_answer_id)
        assert row.ld_patched == pytest.approx(ref, abs=tol("ref"))
    for row in heads.frame.itertuples():
        ref = hook_patch_ld(demo_model, tp.corrupted_ids, tp.clean_ids, "head_out", 2, None, row.head,
                            tp.clean_answer_id, tp.corrupted_answer_id)
        assert row.ld_patched == pytest.approx(ref, abs=tol("ref"))


def test_fast_path_chunks_to_the_memory_budget(tiny_model, monkeypatch):
    import explorer.analyses.patching as patching
    from explorer.core import cache
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    full = patch_sweep(lm, tp, "attn_out", "each").frame["ld_patched"].to_numpy()
    cache.clear_memory()
    monkeypatch.setattr(scheduler, "TOKEN_BUDGET", 7)
    monkeypatch.setattr(scheduler, "PACK_TOKENS", 3)
    monkeypatch.setattr(patching, "load_result", lambda key: None)
    calls = lm.forward_calls
    chunked = patching.patched_logit_diffs(lm, tp, [(Cell("attn_out", l, p),) for l in range(2) for p in range(tp.n_pos)])
    assert lm.forward_calls - calls > 4
    np.testing.assert_allclose(full, chunked, atol=tol("same", fp32=1e-5))


def test_patches_before_the_first_differing_token_are_not_run(tiny_model, monkeypatch):
    """Before the first position where the prompts differ, clean and corrupted activations are equal,
    so those patches change nothing: they cost no pass and report the target run's own LD."""
    import explorer.analyses.patching as patching
    from explorer.core import cache
    lm = tiny_model("qwen2")
    pair = PromptPair("w3 w7 w11 w5 w9 w2", "w3 w7 w11 w5 w8 w2", "w4", "w6")
    tp = tokenize_pair(lm.tokenizer, pair)
    first = tp.differing_positions[0]
    assert first >= 3
    cache.clear_memory()
    monkeypatch.setattr(patching, "load_result", lambda key: None)
    patches = [(Cell(site, l, p),) for site in ("resid_pre", "mlp_out") for l in range(lm.arch.n_layers)
               for p in range(first)]
    calls = lm.forward_calls
    lds = patched_logit_diffs(lm, tp, patches)
    assert lm.forward_calls - calls <= 2  # the source and target runs, no patched pass
    np.testing.assert_allclose(lds, pair_lds(lm, tp)[1], atol=tol("same", fp32=1e-5))
    for l, p in [(0, 0), (1, first - 1)]:
        ref = hook_patch_ld(lm, tp.clean_ids, tp.corrupted_ids, "resid_pre", l, p, None,
                            tp.clean_answer_id, tp.corrupted_answer_id)
        assert lds[patches.index((Cell("resid_pre", l, p),))] == pytest.approx(ref, abs=tol("ref", fp32=1e-5))


def test_sliding_window_shorter_than_the_prompt_is_not_packed(tmp_path):
    """A packed sequence's custom mask would replace the sliding-window mask, so a model whose window
    is shorter than the prompt takes the batched rows; numbers still equal the plain batched path."""
    import json

    import explorer.analyses.patching as patching
    from explorer.core import cache
    from explorer.sources.tiny import build_tiny_model
    folder = build_tiny_model("gemma2", tmp_path / "gemma2")
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    lm = load_test_model(str(folder))
    tp = tokenize_pair(lm.tokenizer, PAIR)
    assert tp.n_pos > lm.torch_model.config.sliding_window == 3
    patches = [(Cell(site, l, p),) for site in ("resid_pre", "attn_out") for l in range(lm.arch.n_layers)
               for p in range(tp.n_pos)]
    patches += [(Cell("head_out", l, None, h),) for l in range(lm.arch.n_layers) for h in (0, 1)]
    fast = scheduler.patched_lds(lm, tp, patches, "denoise")
    cache.clear_memory()
    slow = patching.patched_logit_diffs(lm, tp, patches, "denoise", fast=False)
    np.testing.assert_allclose(fast, slow, atol=tol("same"))
    windowless = load_test_model(str(build_tiny_model("gemma2", tmp_path / "gemma2-full")))
    assert not np.allclose(slow, patching.patched_logit_diffs(windowless, tp, patches, "denoise", fast=False))


@pytest.mark.parametrize("one_pass", [False, True])
def test_unequal_lengths_last_position_both_fast_paths(tiny_model, one_pass):
    import explorer.analyses.patching as patching
    lm = tiny_model("qwen2")
    tp = tokenize_pair(lm.tokenizer, PromptPair("w3 w7 w11 w5", "w3 w8 w5", "w4", "w6"))
    patches = [(Cell(site, l, LAST),) for site in ("resid_pre", "mlp_out") for l in range(lm.arch.n_layers)]
    patches += [(Cell("head_out", l, LAST, h),) for l in range(lm.arch.n_layers) for h in (0, 2)]
    for direction in ("denoise", "noise"):
        fast = scheduler.patched_lds(lm, tp, patches, direction, one_pass=one_pass)
        slow = patching.patched_logit_diffs(lm, tp, patches, direction, fast=False)
        np.testing.assert_allclose(fast, slow, atol=tol("same"))


def test_sweep_over_pairs_averages_each_pairs_own_sweep(tiny_model):
    """Per-cell mean and spread over pairs equal the single-pair sweeps; unusable pairs are skipped
    with their reason; positions that do not line up across pairs are refused."""
    from explorer.analyses.patching import sweep_over_pairs
    lm = tiny_model("llama")
    pairs = [PAIR, PromptPair("w3 w7 w11 w5", "w3 w8 w11 w5", "w4", "w6", id="b"),
             PromptPair("w3 w7", "w3 w8", "w4 w5", "w6", id="two-token")]
    res = sweep_over_pairs(lm, pairs, "head_out", "all", "noise")
    assert res.skipped and res.skipped[0].startswith("two-token:")
    singles = [head_sweep(lm, tokenize_pair(lm.tokenizer, p), "all", "noise").frame for p in pairs[:2]]
    row = res.summary.set_index(["layer", "head"]).loc[(1, 2)]
    values = [float(f.set_index(["layer", "head"]).loc[(1, 2), "damage"]) for f in singles]
    assert row["mean_damage"] == pytest.approx(np.mean(values), abs=1e-6)
    assert row["std_damage"] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
    assert row["n"] == 2 and len(res.per_pair) == 2 * lm.arch.n_layers * lm.arch.n_heads
    assert "mean damage over 2 pairs" in res.title
    with pytest.raises(ExplorerInputError, match="'all' or 'last'"):
        sweep_over_pairs(lm, pairs, "resid_post", "each")
    with pytest.raises(ExplorerInputError, match="No pair"):
        sweep_over_pairs(lm, pairs[2:], "resid_post", "last")
