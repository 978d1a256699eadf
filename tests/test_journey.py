"""A person's journey through the app in a real headless Chromium: page to page by the sidebar's
links, edits on Home and elsewhere, reloads, back/forward, shared links, model switches, clicks
on charts. Every step checks what the page shows, not only that nothing raised."""
import contextlib
import functools
import io
import json
import os

import pytest

from explorer.surfaces import cli
from explorer.core.runtime import REPO_ROOT
from explorer.surfaces.ui.state import DEMO_PAIR
from explorer.surfaces.ui.widgets import PAGES
from tests.browser import (PAGE_LINKS, chromium, chromium_available, current_link, edit_pair, errors, eulerian_walk,
                           new_page, open_page, problems, query, served_app, settle, sidebar_lds, sidebar_links)

pytestmark = pytest.mark.skipif(not chromium_available() and not os.environ.get("CI"),
                                reason="Debian's chromium is not installed (CI installs it)")

# Every page but Weights runs on the pair and shows its LDs in the sidebar (Weights reads only weights).
PAIR_PAGES = [p for p in PAGE_LINKS if p != "Weights"]
# A second demo pair, reached by editing every field of the default one.
EDITED = {"clean": "Man has three fruits , Pear , Plum and Kiwi - 1 Pear 1 Plum and 1",
          "corrupted": "Man has three fruits , Pear , Plum and Kiwi - 1 Pear 1 Kiwi and 1",
          "clean_answer": "Kiwi", "corrupted_answer": "Plum"}


@functools.lru_cache(maxsize=None)
def _cli_baseline(model: str, pair: tuple) -> tuple[float, float]:
    pair = dict(pair)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["baseline", "--model", model, "--clean", pair["clean"], "--corrupted", pair["corrupted"],
                           "--clean-answer", pair["clean_answer"], "--corrupted-answer", pair["corrupted_answer"],
                           "--json"])
    assert status == 0
    data = json.loads(out.getvalue())
    return data["ld_clean"], data["ld_corrupted"]


def cli_lds(model: str, pair: dict) -> tuple[float, float]:
    """LD_clean and LD_corr as the command line's `baseline --json` reports them."""
    return _cli_baseline(model, tuple(sorted((k, pair[k]) for k in EDITED)))


@pytest.fixture(scope="module")
def app_url():
    # The repo's cache/ (git-ignored), where tests/test_smollm2.py prepares SmolLM2 too, so it is
    # fetched and converted once; the app, this process and the CLI all read it.
    mp = pytest.MonkeyPatch()
    mp.setenv("CIRCUIT_EXPLORER_CACHE", str(REPO_ROOT / "cache"))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with served_app(env) as base:
        yield base
    mp.undo()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, app_url):
    p = new_page(browser)
    p.goto(app_url)
    settle(p)
    yield p
    p.context.close()


def assert_page(page, link: str, lds=None) -> None:
    """The browser shows `link`'s page, without an exception, for the pair with these LDs."""
    assert problems(page) == [], f"{link}: {problems(page)}"
    assert current_link(page) == link
    if lds is not None and link in PAIR_PAGES:
        shown = sidebar_lds(page)
        assert shown is not None, f"{link}: no LDs in the sidebar; errors: {errors(page)}"
        assert shown == pytest.approx(lds, abs=2e-3), link


def test_walk_every_page_to_page_transition(page):
    """8 pages, 56 ordered transitions, each by clicking the sidebar link: zero exceptions, and every
    page shows the pair's LDs. Fails on the old code at the first transition (KeyError: 'clean')."""
    lds = cli_lds("demo", DEMO_PAIR.to_dict())
    walk = eulerian_walk(len(PAGE_LINKS))
    assert walk[0] == 0 and len(set(zip(walk, walk[1:]))) == 56
    assert_page(page, "Home", lds)
    for step, target in enumerate(walk[1:], start=1):
        open_page(page, PAGE_LINKS[target])
        assert_page(page, PAGE_LINKS[target], lds)
        assert query(page)["clean"] == DEMO_PAIR.clean, f"step {step}: the URL lost the pair"


def test_edits_on_home_and_another_page_reach_every_page(page):
    """Two fields edited on Home, two in Ablation's sidebar: every page then runs the edited pair,
    with the same LDs as the CLI's baseline for it."""
    expected = cli_lds("demo", EDITED)
    edit_pair(page, "clean", EDITED["clean"])
    edit_pair(page, "clean_answer", EDITED["clean_answer"])
    open_page(page, "Ablation")
    edit_pair(page, "corrupted", EDITED["corrupted"])
    edit_pair(page, "corrupted_answer", EDITED["corrupted_answer"])
    for link in PAGE_LINKS:
        open_page(page, link)
        assert_page(page, link, expected)
    assert {k: query(page)[k] for k in EDITED} == EDITED
    # The analyses themselves use it: Home's metric, the Patching caption, DLA's true LD.
    open_page(page, "Home")
    assert page.get_by_test_id("stMetricValue").first.inner_text().replace("−", "-") == f"{expected[0]:+.3f}"
    open_page(page, "Patching")
    caption = page.get_by_test_id("stCaptionContainer").filter(has_text="patches in").first.inner_text()
    assert f"LD_clean = {expected[0]:+.3f}, LD_corr = {expected[1]:+.3f}" in caption.replace("−", "-")
    open_page(page, "DLA")
    true_ld = page.get_by_test_id("stMetric").filter(has_text="True LD").get_by_test_id("stMetricValue")
    assert float(true_ld.inner_text().replace("−", "-")) == pytest.approx(expected[0], abs=1e-3)


def test_invalid_edit_is_one_message_on_every_page_and_a_valid_edit_recovers(page):
    edit_pair(page, "clean_answer", "Peach Mango")
    for link in PAGE_LINKS:
        open_page(page, link)
        assert problems(page) == []
        # (Weights reads only weights, but its token list starts as the pair's answers.)
        assert len(errors(page)) == 1 and "2 tokens, not one" in errors(page)[0], link
        assert sidebar_links(page).count() == len(PAGES), f"{link}: the page links are gone"
    open_page(page, "Attention")
    edit_pair(page, "clean_answer", "")
    assert len(errors(page)) == 1 and "clean answer is empty" in errors(page)[0]
    edit_pair(page, "clean_answer", "Mango")
    edit_pair(page, "clean", "   ")
    assert len(errors(page)) == 1 and "clean prompt is empty" in errors(page)[0]
    edit_pair(page, "clean", DEMO_PAIR.clean)
    assert errors(page) == []
    lds = cli_lds("demo", DEMO_PAIR.to_dict())
    for link in PAIR_PAGES:
        open_page(page, link)
        assert_page(page, link, lds)


def test_reload_back_forward_and_a_shared_link(page, browser):
    """Reload keeps an edit and a page setting on every page; back and forward land on the page
    and pair they left; the URL opened by another visitor shows the same view."""
    edit_pair(page, "corrupted_answer", "Grape")
    lds = cli_lds("demo", {**DEMO_PAIR.to_dict(), "corrupted_answer": "Grape"})
    open_page(page, "DLA")
    page.get_by_test_id("stRadio").get_by_text("corrupted").click()
    settle(page)
    assert query(page)["dla.run"] == "corrupted"
    for link in PAGE_LINKS:
        open_page(page, link)
        page.reload()
        settle(page)
        assert_page(page, link, lds)
        assert query(page)["corrupted_answer"] == "Grape" and query(page)["dla.run"] == "corrupted"
    open_page(page, "DLA")
    assert page.get_by_test_id("stRadio").locator("input:checked").evaluate("e => e.value") in ("1", "corrupted") \
        or "corrupted" in page.get_by_test_id("stRadio").locator("label:has(input:checked)").inner_text()

    # Back and forward: Patching -> Logit lens -> (edit) -> Attention, then back twice, forward twice.
    open_page(page, "Patching")
    open_page(page, "Logit lens")
    edit_pair(page, "corrupted_answer", "Peach")
    peach = cli_lds("demo", {**DEMO_PAIR.to_dict(), "corrupted_answer": "Peach"})
    open_page(page, "Attention")
    page.go_back()
    settle(page)
    assert_page(page, "Logit lens", peach)
    page.go_back()
    settle(page)
    assert_page(page, "Logit lens", lds)      # the view before the edit
    page.go_back()
    settle(page)
    assert_page(page, "Patching", lds)
    page.go_forward()
    settle(page)
    page.go_forward()
    settle(page)
    assert_page(page, "Logit lens", peach)
    page.go_forward()
    settle(page)
    assert_page(page, "Attention", peach)

    # A copied URL in a fresh browser context (a new visitor, a new session) reproduces the view.
    url = page.url
    other = new_page(browser)
    other.goto(url)
    settle(other)
    assert_page(other, "Attention", peach)
    assert query(other) == query(page)
    other.context.close()


@pytest.fixture(scope="module")
def smollm2_ready(app_url):
    """SmolLM2 prepared in the cache the app reads (required in CI, skipped elsewhere if it cannot be)."""
    from explorer.sources import smollm2
    from explorer.core.errors import ExplorerInputError
    try:
        smollm2.prepare()
    except ExplorerInputError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 could not be prepared here: {exc}")


def test_model_switch_mid_walk(page, smollm2_ready):
    """demo -> smollm2 -> demo from the sidebar of analysis pages: the demo pair does not fit
    SmolLM2's tokenizer, so its default pair is loaded and the page says so; no exception."""
    from explorer.surfaces.ui.state import SMOLLM2_PAIR
    open_page(page, "Logit lens")
    choose(page, "Model", "smollm2")
    assert problems(page) == []
    assert any("default prompt pair" in i for i in page.get_by_test_id("stAlertContentInfo").all_inner_texts())
    assert query(page)["model"] == "smollm2" and query(page)["clean"] == SMOLLM2_PAIR.clean
    smol = cli_lds("smollm2", SMOLLM2_PAIR.to_dict())
    assert_page(page, "Logit lens", smol)
    for link in ("DLA", "Home", "Attention"):
        open_page(page, link)
        assert_page(page, link, smol)
    choose(page, "Model", "demo")
    assert_page(page, "Attention", cli_lds("demo", DEMO_PAIR.to_dict()))
    assert query(page)["model"] == "demo"


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label` with the mouse."""
    box = page.get_by_test_id("stSelectbox").filter(has_text=label).first
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    settle(page)


def cell(page, **fields):
    """The heatmap cell (an SVG mark) whose tooltip fields have these values."""
    marks = page.locator(".vega-embed").first.locator("path[aria-label]")
    for i in range(marks.count()):
        label = marks.nth(i).get_attribute("aria-label")
        parts = dict(p.split(": ", 1) for p in label.split("; ") if ": " in p)
        parts["pos"] = parts.get("pos", "").split(":")[0]   # the axis label is "pos:token"
        if all(parts.get(k) == str(v) for k, v in fields.items()):
            return marks.nth(i)
    raise AssertionError(f"no heatmap cell with {fields}")


def test_click_a_heatmap_cell_drills_down_and_its_links_open_the_head(page, tmp_path):
    from explorer.sources.models import load_model
    from explorer.analyses.patching import head_sweep
    from explorer.core.prompts import tokenize_pair
    open_page(page, "Patching")
    box = cell(page, layer=2, pos=17).bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    settle(page)
    assert query(page)["patching.layer"] == "2"
    body = page.inner_text("body")
    assert "Layer 2 (softmax attention): head_out patched at each position" in body
    lm = load_model("demo")
    heads = head_sweep(lm, tokenize_pair(lm.tokenizer, DEMO_PAIR), "each", "denoise", [2]).frame
    best = heads.loc[heads["recovery"].abs().idxmax()]
    label, pos = best["head_label"], int(best["pos"])
    assert f"Strongest head cell: {label} at position {pos}" in body
    # The drill-down links open the layer's strongest heads at that position (strongest first) on the
    # Attention page, and the strongest head's DLA, with the current pair.
    at_pos = heads[heads["pos"] == pos]
    top = ",".join(f"2.{int(h)}" for h in at_pos.reindex(at_pos["recovery"].abs().sort_values(ascending=False)
                                                              .index)["head"][:3])
    page.get_by_role("link", name=f"Attention of {label}").click()
    settle(page)
    assert_page(page, "Attention", cli_lds("demo", DEMO_PAIR.to_dict()))
    assert query(page)["attention.heads"] == top and query(page)["attention.pos"] == str(pos)
    assert page.get_by_label("Heads (LAYER.HEAD, comma-separated)").input_value() == top
    assert f"Query token: {pos}:" in page.inner_text("body")
    page.go_back()
    settle(page)
    assert_page(page, "Patching")
    page.get_by_role("link", name=f"Direct logit attribution of {label}").click()
    settle(page)
    assert_page(page, "DLA")
    assert page.get_by_label("Layer", exact=True).input_value() == "2"
    assert page.get_by_label("Head", exact=True).input_value() == str(int(best["head"]))
    assert f"{label}: direct contribution to each token's logit" in page.inner_text("body")

    # Another click elsewhere opens that layer; the selectbox can still be changed by hand.
    page.go_back()
    settle(page)
    box = cell(page, layer=1, pos=17).bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    settle(page)
    assert "Layer 1 (softmax attention)" in page.inner_text("body")
    choose(page, "Layer to open", "3")
    assert "Layer 3 (softmax attention)" in page.inner_text("body")

    # Download buttons give files with the heatmap's rows.
    with page.expect_download() as info:
        page.get_by_test_id("stDownloadButton").filter(has_text="CSV").first.click()
    path = tmp_path / "patching.csv"
    info.value.save_as(path)
    import pandas as pd
    frame = pd.read_csv(path)
    assert len(frame) == lm.arch.n_layers * len(tokenize_pair(lm.tokenizer, DEMO_PAIR).clean_ids)
    assert set(frame.columns) >= {"layer", "pos", "recovery"}


def test_forms_and_expanders_work_with_the_mouse(page):
    """The prompt-set form on Patching runs and its choice survives a page change; Home's
    prompt-set expander loads a pair into the editor."""
    open_page(page, "Patching")
    page.get_by_test_id("stForm").get_by_label("Headline pairs").fill("3")
    page.get_by_test_id("stForm").get_by_role("button", name="Run over the set").click()
    settle(page)
    assert problems(page) == [] and errors(page) == []
    assert page.locator(".vega-embed").filter(has_text="mean recovery over 3 pairs").count() == 1
    open_page(page, "Weights")
    open_page(page, "Patching")
    assert page.get_by_test_id("stForm").get_by_label("Headline pairs").input_value() == "3"

    open_page(page, "Home")
    page.locator("summary").filter(has_text="Load a pair from a prompt set").click()
    settle(page)
    page.get_by_role("button", name="Use this pair").click()
    settle(page)
    loaded = page.get_by_label("Clean prompt", exact=True).input_value()
    assert loaded != DEMO_PAIR.clean and query(page)["clean"] == loaded
    open_page(page, "DLA")
    assert query(page)["clean"] == loaded and problems(page) == []


def test_attribution_sends_its_top_heads_to_ablation(page):
    open_page(page, "Attribution")
    link = page.get_by_role("link", name="Ablate the top 5:")
    heads = link.inner_text().split(":", 1)[1].strip()
    link.click()
    settle(page)
    assert_page(page, "Ablation")
    assert page.get_by_label("Targets (heads L3H1 or 3.1; layers attn2, mlp2, resid2)").input_value() == heads
    assert query(page)["ablation.targets"] == heads and errors(page) == []
    page.go_back()
    settle(page)
    assert_page(page, "Attribution")


def test_sae_page_views_a_feature_card_and_keeps_the_view_across_pages(page):
    """SAE features on the shipped demo SAE: the latents heatmap, a click into the Feature card view, a latent
    typed in, another page and back by the browser: the same view, no errors."""
    from explorer.analyses import sae_features as sf
    from explorer.sources.sae import resolve_sae
    from explorer.sources.models import load_model

    open_page(page, "SAE features")
    assert problems(page) == [] and errors(page) == []
    assert page.locator(".vega-embed").filter(has_text="SAE latents at blocks.1.hook_resid_post").count() == 1
    page.get_by_test_id("stRadio").first.get_by_text("Feature card", exact=True).click()
    settle(page)
    ref = sf.pair_latents(load_model("demo"), resolve_sae("demo-resid_post-1"), DEMO_PAIR)
    latent = int(ref.top.sort_values("activation", ascending=False)["latent"].iloc[0])
    field = page.get_by_label("Latent", exact=True)
    field.fill(str(latent))
    field.press("Enter")
    settle(page)
    assert problems(page) == [] and errors(page) == []
    assert query(page)["sae.view"] == "Feature card" and query(page)["sae.latent"] == str(latent)
    assert page.get_by_text(f"Latent {latent} · firing frequency").count() == 1
    open_page(page, "DLA")
    page.go_back()
    settle(page)
    assert current_link(page) == "SAE" and page.get_by_label("Latent", exact=True).input_value() == str(latent)
    assert problems(page) == [] and errors(page) == []


def rendered(page) -> dict:
    """What a view shows, as text: metrics, every chart mark's values, the sidebar's LDs. Charts draw
    after the run ends, so the marks are read once their number has stopped changing."""
    marks = page.locator(".vega-embed path[aria-label]")
    counts = [-1]
    for _ in range(240):
        counts.append(marks.count())
        if counts[-1] > 0 and counts[-1] == counts[-2] == counts[-3 if len(counts) > 2 else -2]:
            break
        page.wait_for_timeout(250)
    return {"metrics": page.get_by_test_id("stMetricValue").all_inner_texts(),
            "marks": [m.get_attribute("aria-label") for m in marks.all()],
            "lds": sidebar_lds(page)}


def test_eight_sessions_on_two_models_at_once_equal_serial_runs(browser, app_url, smollm2_ready):
    """Eight visitors at the same moment (patching, ablation, DLA, attribution on demo and on
    SmolLM2): no exception, and each shows exactly what the same view shows when run alone."""
    import psutil

    from urllib.parse import urlencode

    from explorer.surfaces.ui.state import SMOLLM2_PAIR
    from tests.browser import SERVER_PIDS
    views = [(path, {"model": model, **pair.to_dict(), **settings})
             for model, pair in (("demo", DEMO_PAIR), ("smollm2", SMOLLM2_PAIR))
             for path, settings in (("Patching", {"patching.site": "attn_out"}),
                                    ("Ablation", {"ablation.targets": "L1 attn, 1.3"}),
                                    ("DLA", {"dla.run": "corrupted"}), ("Attribution", {}))]
    urls = [f"{app_url}/{path}?" + urlencode({k: v for k, v in q.items() if k not in ("id", "category", "task",
                                                                                         "notes")})
            for path, q in views]
    alone = []
    for url in urls:
        p = new_page(browser)
        p.goto(url)
        settle(p, timeout=300)
        assert problems(p) == [] and errors(p) == [], url
        alone.append(rendered(p))
        p.context.close()
    server = psutil.Process(SERVER_PIDS[app_url])
    pages = [new_page(browser) for _ in urls]
    for p, url in zip(pages, urls):
        p.goto(url, wait_until="commit")   # all eight ask before any is served
    peak = 0
    for p, url, expected in zip(pages, urls, alone):
        settle(p, timeout=300)
        peak = max(peak, server.memory_info().rss)
        assert problems(p) == [] and errors(p) == [], url
        assert rendered(p) == expected, url
        p.context.close()
    print(f"server RSS after eight concurrent sessions on two models: {peak / 2**20:.0f} MiB")
    assert peak < 4 * 2**30
