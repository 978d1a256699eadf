"""Every result carries the spec that produced it and serialises itself; index columns hold <NA>, never -1."""
from __future__ import annotations

import json

import pytest

from explorer.analyses.ablation import ablate_pair, parse_targets
from explorer.analyses.attribution import attribution_patching
from explorer.analyses.baseline import baseline
from explorer.analyses.dla import dla
from explorer.analyses.lens import logit_lens
from explorer.analyses.patching import head_set_patch, patch_sweep
from explorer.analyses.paths import parse_receiver, path_patch
from explorer.core import positions
from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.core.results import jsonable

PAIR = PromptPair("When Mary and John went to the store , John gave a drink to",
                  "When Mary and John went to the store , Mary gave a drink to", " Mary", " John")


@pytest.fixture(scope="module")
def results(demo_model):
    lm = demo_model
    tp = tokenize_pair(lm.tokenizer, PAIR)
    return lm, tp, {
        "baseline": baseline(lm, tp),
        "patching": patch_sweep(lm, tp, "resid_pre", "each", "denoise"),
        "head set patching": head_set_patch(lm, tp, [(1, 0), (1, 1)]),
        "path patching": path_patch(lm, tp, parse_receiver("L1H0.v", lm.arch)),
        "ablation": ablate_pair(lm, tp, parse_targets("L1H0, mlp0", lm.arch)),
        "attribution patching": attribution_patching(lm, tp),
        "direct logit attribution": dla(lm, tp),
        "logit lens": logit_lens(lm, tp),
    }


def test_every_result_names_its_analysis_model_pair_and_parameters(results):
    lm, tp, found = results
    for analysis, res in found.items():
        body = res.to_json()
        text = json.dumps(body, allow_nan=False)  # strict JSON: no NaN, no numpy types
        spec = json.loads(text)["spec"]
        assert spec["analysis"] == analysis
        assert spec["model"]["weight_hash"] == lm.weight_hash and spec["model"]["dtype"] == lm.dtype
        assert spec["pair"]["clean"] == PAIR.clean and spec["pair"]["corrupted_answer"] == PAIR.corrupted_answer
        assert res.meta()["spec"] == res.spec
    assert found["patching"].spec["params"] == {"site": "resid_pre", "positions": "each", "direction": "denoise",
                                                "metric": "recovery", "cells": lm.arch.n_layers * tp.n_pos}
    assert found["patching"].to_json()["title"] == found["patching"].title


def test_the_json_records_are_the_result_table(results):
    _, _, found = results
    res = found["patching"]
    records = res.to_json()["records"]
    assert len(records) == len(res.frame)
    assert [r["recovery"] for r in records] == pytest.approx(res.frame["recovery"].tolist(), abs=0)
    d = found["direct logit attribution"].to_json()
    assert d["error"] == pytest.approx(found["direct logit attribution"].error)
    assert [r["dla"] for r in d["records"]] == pytest.approx(found["direct logit attribution"].frame["dla"].tolist())


def test_missing_layer_head_and_position_are_na_not_minus_one(results):
    _, _, found = results
    frames = [found["direct logit attribution"].frame, found["attribution patching"].frame,
              found["head set patching"].singles.frame, found["patching"].frame]
    for frame in frames:
        for col in ("layer", "head", "pos"):
            if col in frame:
                assert str(frame[col].dtype) == "Int64", (col, frame[col].dtype)
                assert not (frame[col] < 0).fillna(False).any(), col
    d = found["direct logit attribution"].frame
    assert d.loc[d["kind"] == "embed", "layer"].isna().all() and d.loc[d["kind"] != "head", "head"].isna().all()
    a = found["attribution patching"]
    assert a.table("head_out", per_position=False)["pos"].isna().all()
    assert a.table("head_out")["pos"].notna().all()
    embed = next(r for r in found["direct logit attribution"].to_json()["records"] if r["kind"] == "embed")
    assert embed["layer"] is None and embed["head"] is None


def test_positions_vocabulary(demo_model):
    tp = tokenize_pair(demo_model.tokenizer, PAIR)
    assert positions.cells("each", tp) == list(range(tp.n_pos))
    assert positions.cells("last", tp) == [positions.LAST] and positions.LAST != -1
    assert positions.cells("all", tp) == [None] and positions.cells("1,3", tp) == [1, 3]
    assert positions.indices("last", 5) == [4] and positions.indices("all", 5) is None
    assert positions.indices([0, 2], 5) == [0, 2] and positions.parse(" each ") == "each"
    for bad, message in [("first", "Positions must be each, last, all"), ("99", "out of range")]:
        with pytest.raises(ExplorerInputError, match=message):
            positions.cells(bad, tp)
    unequal = tokenize_pair(demo_model.tokenizer, PromptPair(PAIR.clean, PAIR.corrupted + " the", " Mary", " John"))
    assert positions.cells("last", unequal) == [positions.LAST]
    with pytest.raises(ExplorerInputError, match="same number of tokens"):
        positions.cells("each", unequal)
    assert jsonable({"p": positions.LAST, "x": float("nan")}) == {"p": "LAST", "x": None}


def test_patch_result_methods_the_pages_use(demo_model):
    from explorer.analyses.patching import head_sweep
    tp = tokenize_pair(demo_model.tokenizer, PAIR)
    res = head_sweep(demo_model, tp, "each", "denoise")
    f = res.frame
    best = f.iloc[f["recovery"].abs().to_numpy().argmax()]
    assert res.strongest()["recovery"] == best["recovery"]
    at = f[f["pos"] == int(best["pos"])].sort_values("recovery", key=abs, ascending=False)
    assert res.top_heads(int(best["pos"])) == [int(h) for h in at["head"][:3]]
    reduced = res.per_layer_and_head()
    assert len(reduced) == demo_model.arch.n_layers * demo_model.arch.n_heads
    for r in reduced.itertuples():
        cell = f[(f["layer"] == r.layer) & (f["head"] == r.head)]["recovery"]
        assert abs(r.recovery) == pytest.approx(cell.abs().max())


def test_sae_results_carry_the_spec_too(demo_model):
    from explorer.analyses import sae_features as sf
    from explorer.sources.sae import resolve_sae
    sae = resolve_sae("demo-resid_post-1")
    tp = tokenize_pair(demo_model.tokenizer, PAIR)
    for res, analysis in [(sf.pair_latents(demo_model, sae, tp), "SAE latents"),
                          (sf.reconstruction_health(demo_model, sae, tp), "SAE reconstruction health"),
                          (sf.feature_card(demo_model, sae, 3), "SAE feature card")]:
        body = json.loads(json.dumps(res.to_json(), allow_nan=False))
        assert body["spec"]["analysis"] == analysis and body["spec"]["params"]["sae"]["hook_name"] == sae.cfg.hook_name
        assert body["spec"]["model"]["weight_hash"] == demo_model.weight_hash and res.meta()["spec"] == res.spec
