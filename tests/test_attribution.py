"""Attribution patching agrees with exact patching to first order."""
import pytest
import torch

from explorer.core import engine
from explorer.analyses.attribution import attribution_patching, compare_with_exact, spearman
from explorer.core.cache import get_activations
from explorer.core.errors import ExplorerInputError
from explorer.sources.models import load_model
from explorer.core.prompts import PromptPair, tokenize_pair

PAIR = PromptPair("w3 w7 w11 w5 w9 w2", "w3 w8 w11 w5 w9 w2", "w4", "w6")


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    from explorer.sources.tiny import build_tiny_model
    # float64 is the CPU-only checking dtype: this model stays on the CPU whatever the test device.
    return load_model(str(build_tiny_model("llama", tmp_path_factory.mktemp("l64"), seed=3)), device="cpu",
                      dtype="float64")


def finite_difference(lm, tp, site, layer, pos, head, alpha=1e-2):
    """Central difference of LD along a_corr + t*(a_clean - a_corr) at t=0, normalised like recovery.
    (Attention softmax and RMSNorm run in float32 even in a float64 model, so a central
    difference with a moderate step beats a one-sided one with a tiny step.)"""
    _, clean = get_activations(lm, tp.clean_ids, [(site, layer)])
    _, corr = get_activations(lm, tp.corrupted_ids, [(site, layer)])

    def ld_at(t):
        value = corr[(site, layer)] + t * (clean[(site, layer)] - corr[(site, layer)])  # [pos, ...]
        if head is not None:
            value = value[:, head]
        iv = engine.Intervention(site, layer, torch.tensor([0]), None if pos is None else torch.tensor([pos]),
                                 (value if pos is None else value[pos]).unsqueeze(0),
                                 None if head is None else torch.tensor([head]))
        logits = engine.run(lm, torch.tensor([list(tp.corrupted_ids)]), [iv]).logits
        return float(logits[0, tp.clean_answer_id] - logits[0, tp.corrupted_answer_id])

    clean_logits = engine.run(lm, torch.tensor([list(tp.clean_ids)])).logits
    corr_logits = engine.run(lm, torch.tensor([list(tp.corrupted_ids)])).logits
    span = float(clean_logits[0, tp.clean_answer_id] - clean_logits[0, tp.corrupted_answer_id]) - \
        float(corr_logits[0, tp.clean_answer_id] - corr_logits[0, tp.corrupted_answer_id])
    return (ld_at(alpha) - ld_at(-alpha)) / (2 * alpha) / span


def test_estimate_equals_first_order_effect(llama64):
    lm = llama64
    tp = tokenize_pair(lm.tokenizer, PAIR)
    res = attribution_patching(lm, tp)
    f = res.frame
    for site, layer, pos, head in [("resid_pre", 1, 1, None), ("resid_pre", 0, 1, None), ("mlp_out", 0, 3, None),
                                   ("attn_out", 1, 5, None), ("head_out", 1, None, 2), ("head_out", 0, 4, 1)]:
        fd = finite_difference(lm, tp, site, layer, pos, head)
        sel = (f.site == site) & (f.layer == layer) & (f.pos.isna() if pos is None else f.pos == pos)
        if head is not None:
            sel &= f["head"] == head
        assert sel.sum() == 1, (site, layer, pos, head, sel.sum())
        est = f[sel]["estimate"].iloc[0]
        assert est == pytest.approx(fd, rel=2e-3, abs=1e-5), (site, layer, pos, head)


def test_scatter_against_exact(demo_model):
    from explorer.surfaces.ui.state import DEMO_PAIR
    tp = tokenize_pair(demo_model.tokenizer, DEMO_PAIR)
    res = attribution_patching(demo_model, tp)
    merged = compare_with_exact(demo_model, tp, res, "mlp_out")
    assert len(merged) == demo_model.arch.n_layers * tp.n_pos
    assert spearman(merged["estimate"], merged["exact"]) > 0.5
    # head totals are the sums of their per-position estimates
    per = res.table("head_out")
    tot = res.table("head_out", per_position=False).set_index(["layer", "head"])["estimate"]
    assert per.groupby(["layer", "head"])["estimate"].sum().to_numpy() == pytest.approx(tot.to_numpy(), abs=1e-5)
    assert list(res.ranked_heads(5)["estimate"].abs()) == sorted(res.ranked_heads(5)["estimate"].abs(), reverse=True)


def test_unequal_lengths_refused(tiny_model):
    lm = tiny_model("llama")
    with pytest.raises(ExplorerInputError, match="same number of tokens"):
        attribution_patching(lm, tokenize_pair(lm.tokenizer, PromptPair("w1 w2", "w1", "w4", "w6")))
