"""The Attention page's query x key heatmaps: the numbers are the attention module's own weights,
and the patching and DLA views link to it with their heads and positions preset."""
import json

import pytest
import torch

from explorer.analyses.attention import attention_grid
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.surfaces.ui import charts
from explorer.surfaces.ui.state import DEMO_PAIR
from tests.conftest import model_ids, tol


def reference_patterns(lm, ids) -> dict[int, torch.Tensor]:
    """Each layer's attention weights [head, query, key] taken by plain torch forward hooks on the
    attention modules (transformers' eager attention returns them as the output's second item),
    checked against transformers' own output_attentions."""
    model = lm.torch_model
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    assert len(modules) == lm.arch.n_layers
    found = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: found.__setitem__(i, out[1][0].float().cpu()))
             for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            out = model(model_ids(lm, ids), output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    for i, weights in found.items():
        torch.testing.assert_close(weights, out.attentions[i][0].float().cpu())
    return found


def check_grid(lm, tp, heads, run):
    grid = attention_grid(lm, tp, heads, run)
    ids = tp.clean_ids if run == "clean" else tp.corrupted_ids
    ref = reference_patterns(lm, ids)
    n = len(ids)
    for (layer, head), rows in grid.frame.groupby(["layer", "head"], sort=False):
        expected = ref[layer][head]
        got = torch.zeros(n, n)
        got[torch.tensor(rows["query_pos"].values), torch.tensor(rows["key_pos"].values)] = torch.tensor(
            rows["weight"].values, dtype=torch.float32)
        torch.testing.assert_close(got, expected, atol=tol("act"), rtol=tol("act"))
        assert len(rows) == n * (n + 1) // 2   # every causal cell, once
    return grid


def test_heatmap_values_are_the_attention_modules_weights_demo(demo_model):
    tp = tokenize_pair(demo_model.tokenizer, DEMO_PAIR)
    grid = check_grid(demo_model, tp, [(0, 2), (2, 1), (3, 1)], "clean")
    check_grid(demo_model, tp, [(1, 0)], "corrupted")
    # Token labels on both axes are 'pos:token' of the run's own tokens.
    row = grid.frame[(grid.frame["query_pos"] == 12) & (grid.frame["key_pos"] == 3)].iloc[0]
    assert row["query_token"] == f"12:{tp.clean_tokens[12]}" and row["key_token"] == f"3:{tp.clean_tokens[3]}"


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_heatmap_values_are_the_attention_modules_weights_zoo(tiny_model, family):
    """GQA families (llama, qwen2 tiny configs share key/value heads) index the query head, not the K/V head."""
    lm = tiny_model(family)
    pair = PromptPair(clean="w3 w7 w11 w5 w9 w2", corrupted="w3 w8 w11 w5 w9 w2", clean_answer="w4",
                      corrupted_answer="w6")
    tp = tokenize_pair(lm.tokenizer, pair)
    check_grid(lm, tp, [(0, 0), (lm.arch.n_layers - 1, lm.arch.n_heads - 1)], "clean")


def test_heatmap_chart_has_both_axes_labelled_and_hover_values(demo_model):
    tp = tokenize_pair(demo_model.tokenizer, DEMO_PAIR)
    grid = attention_grid(demo_model, tp, [(2, 1), (3, 1)], "clean", query_pos=20)
    spec = charts.attention_heatmaps(grid.frame, grid.title, grid.query_pos).to_dict()
    text = json.dumps(spec)
    assert spec["facet"]["field"] == "head_label" and spec["columns"] >= 2   # heads side by side
    layer = spec["spec"]["layer"][0]
    assert layer["encoding"]["x"]["field"] == "key_token" and layer["encoding"]["y"]["field"] == "query_token"
    assert any(t.get("field") == "weight" for t in layer["encoding"]["tooltip"])
    assert "20:and" in text and "Outlined: query row 20" in text
    data = next(iter(spec["datasets"].values()))
    assert len(data) == len(grid.frame)


def test_attention_page_draws_a_heatmap_per_head(demo_model):
    from tests.test_app import page
    at = page("pages/6_Attention.py", heads="2.1,3.1", pos="20", run="corrupted")
    assert not at.exception and not at.error, [e.value for e in at.error]
    import pyarrow as pa
    chart = [c for c in at.get("vega_lite_chart") if "facet" in json.loads(c.proto.spec)][0]
    assert "corrupted run" in json.dumps(json.loads(chart.proto.spec)["title"])
    [data] = [pa.ipc.open_stream(d.data.data).read_pandas() for d in chart.proto.datasets]
    tp = tokenize_pair(demo_model.tokenizer, DEMO_PAIR)
    expected = attention_grid(demo_model, tp, [(2, 1), (3, 1)], "corrupted", 20).frame
    assert list(data["head_label"].unique()) == ["L2H1", "L3H1"]
    assert data["weight"].tolist() == pytest.approx(expected["weight"].tolist())


def attention_links(at) -> list[tuple[str, dict]]:
    """(label, the page settings its URL presets) of each link to the Attention page."""
    from urllib.parse import parse_qs
    return [(e.proto.label, {k: v[0] for k, v in parse_qs(e.proto.query_string).items() if k.startswith("attention.")})
            for e in at.get("page_link") if e.proto.label.startswith("Attention of")]


def test_patching_and_dla_link_to_the_attention_page_with_heads_and_position(demo_model):
    from explorer.analyses.dla import dla
    from explorer.analyses.patching import head_sweep
    from tests.test_app import page

    tp = tokenize_pair(demo_model.tokenizer, DEMO_PAIR)
    at = page("pages/1_Patching.py", layer="2")
    assert not at.exception and not at.error
    [(label, preset)] = attention_links(at)
    frame = head_sweep(demo_model, tp, "each", "denoise", [2]).frame
    best = frame.loc[frame["recovery"].abs().idxmax()]
    at_pos = frame[frame["pos"] == best["pos"]]
    top = at_pos.reindex(at_pos["recovery"].abs().sort_values(ascending=False).index).head(3)
    assert preset == {"attention.heads": ",".join(f"2.{int(h)}" for h in top["head"]),
                      "attention.pos": str(int(best["pos"]))}, label

    at = page("pages/4_DLA.py")
    assert not at.exception and not at.error
    [(label, preset)] = attention_links(at)
    heads = dla(demo_model, tp, "clean").frame.query("kind == 'head'")
    top = heads.reindex(heads["dla"].abs().sort_values(ascending=False).index).head(3)
    assert preset == {"attention.heads": ",".join(f"{int(r.layer)}.{int(r.head)}" for r in top.itertuples()),
                      "attention.pos": str(tp.n_pos - 1)}, label
    # Following the link opens those heads at that position.
    at = page("pages/6_Attention.py", heads=preset["attention.heads"], pos=preset["attention.pos"])
    assert not at.exception and not at.error
    assert at.slider(key="w.attention.pos").value == tp.n_pos - 1
