"""explorer/surfaces/exports.py: PNG, SVG and HTML of a chart and CSV/JSON of its frame, each with the run's spec;
and the app's download buttons and view link on every page."""
import io
import json
import re
import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from explorer.core.runtime import REPO_ROOT
from explorer.surfaces import exports
from explorer.surfaces.ui.state import DEMO_PAIR
from explorer.surfaces.views import View, render
from tests.conftest import TEST_DEVICE, TEST_DTYPE

SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def patching_view(demo_model):
    """The demo pair's residual patching heatmap, as the Patching page draws it."""
    return render(demo_model, View("patching", "demo", DEMO_PAIR, {"site": "resid_post", "positions": "each"}))


def _chart_values(vega_lite: dict) -> list[dict]:
    """The chart's main data rows inlined in a Vega-Lite spec (the largest dataset: a heatmap's outline
    layer holds a few of the same rows again)."""
    return max(vega_lite.get("datasets", {}).values(), key=len)


def test_spec_names_model_weights_prompts_site_positions_direction_metric(patching_view, demo_model):
    spec = patching_view.spec
    assert spec["model"]["model_id"] == demo_model.model_id
    assert spec["model"]["weight_hash"] == demo_model.weight_hash
    assert spec["prompts"]["clean"] == DEMO_PAIR.clean and spec["prompts"]["corrupted_answer"] == DEMO_PAIR.corrupted_answer
    assert (spec["site"], spec["positions"], spec["direction"], spec["metric"]) == ("resid_post", "each", "denoise",
                                                                                   "recovery")
    # The result's own spec (explorer.core.results) travels whole beside the view's.
    assert spec["analysis"]["analysis"] == "patching" and spec["analysis"]["model"]["weight_hash"] == demo_model.weight_hash


def test_png_is_a_png_at_twice_the_scale_with_the_spec_and_data_inside(patching_view):
    png = exports.chart_png(patching_view.chart, patching_view.spec)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width = int.from_bytes(png[16:20], "big")
    svg_width = float(ET.fromstring(exports.chart_svg(patching_view.chart, patching_view.spec)).get("width"))
    assert width == pytest.approx(2 * svg_width, abs=2)
    meta = exports.png_metadata(png)
    assert meta["spec"] == patching_view.spec
    rows = _chart_values(meta["vega_lite"])
    assert sorted(r["recovery"] for r in rows) == pytest.approx(sorted(patching_view.frame["recovery"]))
    # A PNG reader still accepts the file with our chunk in it.
    from PIL import Image
    with Image.open(io.BytesIO(png)) as image:
        image.verify()


def test_svg_parses_and_carries_the_spec_and_the_data(patching_view):
    svg = exports.chart_svg(patching_view.chart, patching_view.spec)
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    meta = json.loads(root.find(f"{SVG_NS}metadata").text)
    assert meta["spec"] == patching_view.spec
    assert len(_chart_values(meta["vega_lite"])) == len(patching_view.frame)
    # The drawing itself: the title and one rect per heatmap cell (plus the outline marks).
    text = " ".join(t.text or "" for t in root.iter(f"{SVG_NS}text"))
    assert "resid_post patched at each position" in text
    assert len(list(root.iter(f"{SVG_NS}path"))) >= len(patching_view.frame)


def test_html_is_standalone_with_the_data_values_and_spec(patching_view):
    page = exports.chart_html(patching_view.chart, patching_view.spec)
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page, re.I)
    block = re.search(r'<script type="application/json" id="circuit-explorer">(.*?)</script>', page, re.S)
    assert json.loads(block.group(1))["spec"] == patching_view.spec
    strongest = patching_view.frame.loc[patching_view.frame["recovery"].abs().idxmax()]
    assert json.dumps(float(strongest["recovery"])) in page   # the data rows are inline
    assert "vegaEmbed" in page                                # and the renderer with them


def test_csv_and_json_hold_the_frame_and_the_spec(patching_view):
    files = exports.all_files("view", patching_view.frame, patching_view.spec, patching_view.chart)
    assert set(files) == {f"view.{s}" for s in ("csv", "json", "spec.json", "png", "svg", "html")}
    csv = pd.read_csv(io.BytesIO(files["view.csv"]))
    pd.testing.assert_frame_equal(csv[["layer", "pos", "recovery"]].reset_index(drop=True),
                                  patching_view.frame[["layer", "pos", "recovery"]].reset_index(drop=True),
                                  check_dtype=False)
    payload = json.loads(files["view.json"])
    assert payload["spec"] == patching_view.spec and len(payload["records"]) == len(patching_view.frame)
    assert json.loads(files["view.spec.json"]) == patching_view.spec


def test_every_kind_of_chart_exports(demo_model):
    """Facets, layers and grouped bars (ablation, attention, DLA, lens) render offline too."""
    for view in (View("ablation", "demo", DEMO_PAIR, {"targets": "L1 attn, L2H0"}), View("attention", "demo", DEMO_PAIR),
                 View("attention", "demo", DEMO_PAIR, {"heads": "1.4,2.0", "pos": "17"}, panel="rows"),
                 View("dla", "demo", DEMO_PAIR, panel="layers"), View("lens", "demo", DEMO_PAIR),
                 View("home", "demo", DEMO_PAIR)):
        shown = render(demo_model, view)
        root = ET.fromstring(exports.chart_svg(shown.chart, shown.spec))
        assert json.loads(root.find(f"{SVG_NS}metadata").text)["spec"]["page"] == view.page


PAGES = ["pages/1_Patching.py", "pages/2_Ablation.py", "pages/3_Attribution.py", "pages/4_DLA.py",
         "pages/5_Logit_lens.py", "pages/6_Attention.py", "pages/7_Weights.py"]


def test_every_page_offers_picture_and_data_downloads_and_a_link(demo_model):
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=240)
    at.query_params.update({"device": TEST_DEVICE.split(":")[0], "dtype": TEST_DTYPE, "patching.site": "head_out"})
    for path in PAGES:
        at.switch_page(path)
        at.run()
        assert not at.exception, path
        labels = [b.proto.label for b in at.get("download_button")]
        for label in ("PNG", "SVG", "HTML", "CSV", "JSON"):
            assert label in labels, (path, labels)
        assert labels.count("PNG") == labels.count("CSV"), path   # every exported chart gets pictures
        links = [c.value for c in at.code if "model=demo" in c.value]
        assert links, path
    assert any("patching.site=head_out" in link for link in
               [c.value for c in (at.switch_page("pages/1_Patching.py").run()).code])


def test_a_results_meta_fills_the_spec(demo_model):
    """Pages may pass `result.meta()`: its spec is kept whole and names the model and the four fields."""
    from explorer.analyses.patching import patch_sweep
    from explorer.core.prompts import tokenize_pair
    res = patch_sweep(demo_model, tokenize_pair(demo_model.tokenizer, DEMO_PAIR), "attn_out", "last", "noise")
    spec = exports.run_spec(None, DEMO_PAIR, "patching", {}, **res.meta())
    assert spec["model"]["weight_hash"] == demo_model.weight_hash and spec["analysis"] == res.spec
    assert (spec["site"], spec["positions"], spec["direction"], spec["metric"]) == ("attn_out", "last", "noise", "damage")
    assert spec["title"] == res.title
