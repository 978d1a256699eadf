"""Ablation checked against plain torch hooks; shifts against each run's own baseline."""
import numpy as np
import pytest
import torch

from explorer.analyses.ablation import Reference, Target, ablate_pair, ablate_set, ablated_lds, bootstrap_ci, parse_targets
from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.core.runtime import to_host
from tests.conftest import model_ids, tol

PAIR = PromptPair("w3 w7 w11 w5 w9 w2", "w3 w8 w11 w5 w9 w2", "w4", "w6")
REF = [PromptPair(f"w{a} w{b} w{c} w5 w9 w2", "w3 w8 w11 w5 w9 w2", "w4", "w6") for a, b, c in
       [(10, 12, 14), (20, 22, 24), (30, 31, 33), (40, 41, 42)]]


def hook_ablate_ld(lm, ids, target, values, pos, answers):
    """Independent: overwrite the target's activation with `values` ([pos, d] or [pos, d_head]) via hooks."""
    model, sites = lm.torch_model, lm.sites
    sel = slice(None) if pos is None else pos

    def edit(x):
        x = x.clone()
        if target.kind == "head":
            v = x.view(*x.shape[:2], lm.arch.heads_in(target.layer), -1)
            v[0, sel, target.head] = values[sel]
        else:
            x[0, sel] = values[sel]
        return x

    if target.kind == "head":
        h = sites.o_proj(model, target.layer).register_forward_pre_hook(lambda m, a: (edit(a[0]),))
    else:
        module = {"attn": sites.mixer, "mlp": sites.mlp, "resid": sites.layer}[target.kind](model, target.layer)
        h = module.register_forward_hook(lambda m, a, o: (edit(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else edit(o))
    with torch.no_grad():
        logits = model(model_ids(lm, ids)).logits[0, -1]
    h.remove()
    return float(logits[answers[0]] - logits[answers[1]])


def plain_acts(lm, ids, target):
    store = {}
    model, sites = lm.torch_model, lm.sites
    def keep_input(module, args):
        store["x"] = args[0].clone()

    def keep_output(module, args, output):
        store["x"] = (output[0] if isinstance(output, tuple) else output).clone()

    if target.kind == "head":
        h = sites.o_proj(model, target.layer).register_forward_pre_hook(keep_input)
    else:
        module = {"attn": sites.mixer, "mlp": sites.mlp, "resid": sites.layer}[target.kind](model, target.layer)
        h = module.register_forward_hook(keep_output)
    with torch.no_grad():
        model(model_ids(lm, ids))
    h.remove()
    x = store["x"][0]
    return x.view(x.shape[0], lm.arch.heads_in(target.layer), -1)[:, target.head] if target.kind == "head" else x


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("target", [Target("head", 1, 2), Target("attn", 0), Target("mlp", 1), Target("resid", 0)])
@pytest.mark.parametrize("pos", [None, 5, 2])
def test_zero_mean_resample_match_hooks(tiny_model, family, target, pos):
    lm = tiny_model(family)
    tp = tokenize_pair(lm.tokenizer, PAIR)
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    ref = Reference.from_pairs(lm, REF, seed=1)
    positions = "all" if pos is None else [pos]
    ids = tp.clean_ids
    # zero
    got = ablated_lds(lm, ids, answers, [[target]], "zero", positions)[0]
    zeros = torch.zeros_like(plain_acts(lm, ids, target))
    assert got == pytest.approx(hook_ablate_ld(lm, ids, target, zeros, pos, answers), abs=tol("ref"))
    # mean over all positions of all reference prompts, computed independently
    ref_ids = [tuple(lm.tokenizer(p.clean)["input_ids"]) for p in REF]
    mean = torch.cat([plain_acts(lm, r, target) for r in ref_ids]).mean(0)
    got = ablated_lds(lm, ids, answers, [[target]], "mean", positions, ref)[0]
    expect = hook_ablate_ld(lm, ids, target, mean.expand(len(ids), -1), pos, answers)
    assert got == pytest.approx(expect, abs=tol("ref"))
    # resample: the value comes from one same-length reference prompt; check against each candidate
    got = ablated_lds(lm, ids, answers, [[target]], "resample", positions, ref)[0]
    candidates = [hook_ablate_ld(lm, ids, target, plain_acts(lm, r, target), pos, answers) for r in ref_ids]
    assert min(abs(got - c) for c in candidates) < tol("ref")


def test_corrupted_shift_is_against_corrupted_baseline(tiny_model):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    res = ablate_pair(lm, tp, [Target("head", 1, 0), Target("mlp", 0)], "zero")
    corr = res.frame[res.frame.run == "corrupted"]
    with torch.no_grad():
        logits = to_host(lm.torch_model(model_ids(lm, tp.corrupted_ids)).logits[0, -1])
    ld_corr = float(logits[tp.clean_answer_id] - logits[tp.corrupted_answer_id])
    assert np.allclose(corr["ld_run"], ld_corr, atol=tol("ref", fp32=1e-5))
    assert np.allclose(corr["shift"], corr["ld_ablated"] - ld_corr, atol=tol("ref", fp32=1e-6))
    assert list(corr["target"]) == ["L1H0", "L0 mlp", "combined"]
    clean = res.frame[res.frame.run == "clean"]
    assert np.allclose(clean["relative_drop"], (clean["ld_run"] - clean["ld_ablated"]) / clean["ld_run"])
    assert corr["relative_drop"].isna().all()


def test_parse_targets(tiny_model):
    arch = tiny_model("llama").arch
    assert parse_targets("L1H2, 0.3, attn1, mlp0, resid1, L0 mlp", arch) == [
        Target("head", 1, 2), Target("head", 0, 3), Target("attn", 1), Target("mlp", 0), Target("resid", 1), Target("mlp", 0)]
    for bad, msg in (("L9H0", "Layer 9"), ("L1H9", "Head 9"), ("banana", "Cannot read"), ("", "No targets")):
        with pytest.raises(ExplorerInputError, match=msg):
            parse_targets(bad, arch)


def test_prompt_set_statistics(demo_model):
    from explorer.core.prompts import load_prompt_set
    from explorer.core.runtime import REPO_ROOT
    ps = load_prompt_set(REPO_ROOT / "prompts" / "demo_ioi.jsonl")
    pairs = ps.by_category("headline")[:24] + ps.by_category("control")[:10]
    targets = parse_targets("attn1", demo_model.arch)
    res = ablate_set(demo_model, pairs, targets, "zero", n_random=3, n_boot=200)
    head = res.per_pair[res.per_pair.category == "headline"]
    m = res.metrics
    assert m["mean_drop"] == pytest.approx(head["drop_clean"].mean())
    assert m["relative_drop_ratio_of_means"] == pytest.approx(head["drop_clean"].mean() / head["ld_clean"].mean())
    assert m["relative_drop_mean_of_ratios"] == pytest.approx((head["drop_clean"] / head["ld_clean"]).mean())
    lo, hi = m["mean_drop_ci95"]
    assert lo <= m["mean_drop"] <= hi
    ctrl = res.per_pair[res.per_pair.category == "control"]
    assert m["specificity"] == pytest.approx(m["mean_drop"] / max(ctrl["drop_clean"].abs().mean(), 0.1))
    assert len(res.random_baseline) == 3 and res.status in ("pass", "pass_with_warnings", "fail")
    # shifts on the corrupted run are against the corrupted baseline
    assert np.allclose(res.per_pair["shift_corrupted"], res.per_pair["ld_ablated_corrupted"] - res.per_pair["ld_corrupted"])
    card = res.run_card(demo_model, "prompts/demo_ioi.jsonl", ps.sha256)
    assert card["status"] == res.status and card["model"]["weight_sha256"] == demo_model.weight_hash


def test_bootstrap_ci_brackets_the_mean():
    values = np.random.default_rng(0).normal(1.0, 0.5, 200)
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi and hi - lo < 0.3
