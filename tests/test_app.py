"""Streamlit pages driven by AppTest on the bundled demo model."""
import pytest
from streamlit.testing.v1 import AppTest

from explorer.analyses.baseline import baseline
from explorer.core.runtime import REPO_ROOT
from explorer.surfaces.ui.state import DEMO_PAIR, GLOBAL_KEYS
from tests.conftest import TEST_DEVICE, TEST_DTYPE

TIMEOUT = 240


PAGE_NAMES = {"app.py": "home", "pages/1_Patching.py": "patching", "pages/2_Ablation.py": "ablation",
              "pages/3_Attribution.py": "attribution", "pages/4_DLA.py": "dla", "pages/5_Logit_lens.py": "lens",
              "pages/6_Attention.py": "attention", "pages/7_Weights.py": "weights"}


def page(name: str, **query) -> AppTest:
    """Open `name` the way a user does: through the app's entry point, so page links resolve.
    `query` is the URL's query: the model and pair by name, a page setting by its short name."""
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=TIMEOUT)
    # The app runs where the suite's fixtures run (CIRCUIT_EXPLORER_TEST_DEVICE / _DTYPE).
    query = {"device": TEST_DEVICE.split(":")[0], "dtype": TEST_DTYPE, **query}
    for k, v in query.items():
        at.query_params[k if k in GLOBAL_KEYS else f"{PAGE_NAMES[name]}.{k}"] = v
    if name != "app.py":
        at.switch_page(name)
    return at.run()


def test_home_opens_on_demo_with_baseline(demo_model):
    at = page("app.py")
    assert not at.exception
    assert not at.error
    metrics = {m.label: float(m.value) for m in at.metric}
    ref = baseline(demo_model, DEMO_PAIR)
    assert metrics["LD clean run"] == pytest.approx(ref.ld_clean, abs=1e-3)
    assert metrics["LD corrupted run"] == pytest.approx(ref.ld_corrupted, abs=1e-3)
    assert at.text_area(key="w.clean").value == DEMO_PAIR.clean
    assert at.query_params["model"] == ["demo"] or at.query_params["model"] == "demo"


def test_prompt_set_pickers_list_the_models_own_sets_first(demo_model):
    at = page("app.py")
    options = at.selectbox(key="w.home.set_name").options
    assert options[0].startswith("demo_")
    assert [o.startswith("demo_") for o in options] == sorted((o.startswith("demo_") for o in options), reverse=True)


def test_home_bad_input_shows_one_message(demo_model):
    at = page("app.py")
    at.text_input(key="w.clean_answer").set_value("Mango Peach").run()
    assert not at.exception
    assert len(at.error) == 1 and "2 tokens, not one" in at.error[0].value
    at.text_input(key="w.clean_answer").set_value("Mango").run()
    at.text_area(key="w.clean").set_value("").run()
    assert not at.exception and "clean prompt is empty" in at.error[0].value
    at.text_area(key="w.clean").set_value(" ".join(["Mango"] * 70)).run()
    assert not at.exception and len(at.error) == 1 and "context of 64 positions" in at.error[0].value
    at.text_area(key="w.clean").set_value(DEMO_PAIR.clean).run()
    at.text_input(key="w.corrupted_answer").set_value("Mango").run()
    assert not at.exception and len(at.error) == 1 and "are the same token" in at.error[0].value
    at.text_input(key="w.corrupted_answer").set_value("Orange").run()
    assert not at.exception and not at.error and float(at.metric[0].value) > 0


def test_home_state_comes_from_the_url(demo_model):
    at = page("app.py", clean="Man has three fruits , Pear , Plum and Kiwi - 1 Pear 1 Plum and 1",
              corrupted="Man has three fruits , Pear , Plum and Kiwi - 1 Pear 1 Kiwi and 1",
              clean_answer="Kiwi", corrupted_answer="Plum")
    assert not at.exception and not at.error
    assert at.text_input(key="w.clean_answer").value == "Kiwi"
    assert float(at.metric[0].value) > 5


def test_unknown_model_is_one_message():
    at = page("app.py")
    at.selectbox(key="w.model_choice").set_value("other").run()
    at.text_input(key="w.model_path").set_value("/no/such/model").run()
    assert not at.exception
    assert len(at.error) == 1 and "does not exist" in at.error[0].value
    at.selectbox(key="w.model_choice").set_value("demo").run()
    assert not at.exception and not at.error


@pytest.mark.parametrize("model", ["/etc", "/no/such/model", "../../outside", "some-org/some-hub-model"])
def test_a_link_cannot_make_the_app_load_an_arbitrary_model(demo_model, model):
    """A tampered or shared URL naming a folder or hub id is not loaded: the demo model runs and a
    notice says how to load that model on purpose (typing it in the sidebar)."""
    at = page("app.py", model=model)
    assert not at.exception and not at.error
    assert any("does not load from a link" in i.value for i in at.info)
    assert at.query_params["model"] in ("demo", ["demo"])
    assert float(at.metric[0].value) == pytest.approx(baseline(demo_model, DEMO_PAIR).ld_clean, abs=1e-3)


def test_a_link_may_name_a_folder_typed_in_this_session(tiny_model):
    folder = tiny_model("llama").model_id
    at = page("app.py")
    at.selectbox(key="w.model_choice").set_value("other").run()
    at.text_input(key="w.model_path").set_value(folder).run()
    at.selectbox(key="w.model_choice").set_value("demo").run()
    at.query_params["model"] = folder   # e.g. the browser's back button to that view
    at.run()
    assert not any("does not load from a link" in i.value for i in at.info)
    assert at.query_params["model"] in (folder, [folder])


def test_patching_page_and_drill_down(demo_model):
    at = page("pages/1_Patching.py")
    assert not at.exception and not at.error
    # The set-completion pair differs at one position: the layer-0 artefact warning is shown.
    assert any("positions where the clean and corrupted tokens differ" in w.value for w in at.warning)
    at.selectbox(key="w.patching.layer").set_value(2).run()
    assert not at.exception
    assert any("Strongest head cell" in m.value for m in at.markdown)


def test_patching_page_over_a_prompt_set(demo_model):
    from explorer.analyses.patching import sweep_over_pairs
    from explorer.core.prompts import load_prompt_set
    at = page("pages/1_Patching.py", site="head_out", positions="all")
    at.selectbox(key="w.patching.set_positions").set_value("all")
    form_set = [s for s in at.selectbox if s.label == "Prompt set"][0]
    form_set.set_value("demo_ioi.jsonl")
    [n for n in at.number_input if n.label == "Headline pairs"][0].set_value(4)
    [b for b in at.button if b.label == "Run over the set"][0].click().run()
    assert not at.exception and not at.error
    pairs = load_prompt_set(REPO_ROOT / "prompts" / "demo_ioi.jsonl").by_category("headline")[:4]
    ref = sweep_over_pairs(demo_model, pairs, "head_out", "all").summary
    shown = at.dataframe[-1].value
    top = ref.reindex(ref["mean_recovery"].abs().sort_values(ascending=False).index).iloc[0]
    assert shown.iloc[0]["head_label"] == top["head_label"]
    assert shown.iloc[0]["mean_recovery"] == pytest.approx(top["mean_recovery"], abs=1e-6)


def test_patching_page_path_patching(demo_model):
    from explorer.analyses.paths import path_patch
    from explorer.core.prompts import tokenize_pair
    at = page("pages/1_Patching.py", receiver="3.1.q")
    assert not at.exception and not at.error
    res = path_patch(demo_model, tokenize_pair(demo_model.tokenizer, DEMO_PAIR), (3, 1, "q"))
    assert len(res.frame) == 3 * 8
    at = page("pages/1_Patching.py", receiver="3.1.x")
    assert not at.exception and len(at.error) == 1


def test_patching_page_head_set_and_url_settings(demo_model):
    at = page("pages/1_Patching.py", site="head_out", positions="all", direction="noise", heads="2.0, 3.1")
    assert not at.exception and not at.error
    labels = [m.label for m in at.metric]
    assert "Joint damage" in labels and "Joint − sum (superadditivity)" in labels
    assert at.query_params["patching.direction"] in ("noise", ["noise"])


@pytest.mark.parametrize("name, query", [
    ("pages/2_Ablation.py", {"targets": "L1 attn, 2.3", "method": "zero"}),
    ("pages/2_Ablation.py", {"targets": "L1 attn", "method": "mean"}),
    ("pages/2_Ablation.py", {"targets": "L1H3, mlp2", "method": "resample", "positions": "chosen"}),
    ("pages/3_Attribution.py", {}),
    ("pages/4_DLA.py", {"layer": "2", "head": "1"}),
    ("pages/4_DLA.py", {"run": "corrupted"}),
    ("pages/5_Logit_lens.py", {}),
    ("pages/6_Attention.py", {"layer": "1", "head": "2", "pos": "12"}),
    ("pages/7_Weights.py", {"layer": "3", "head": "0"}),
])
def test_analysis_pages_render(demo_model, name, query):
    at = page(name, **query)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_ablation_page_shows_both_runs_against_own_baselines(demo_model):
    from explorer.analyses.ablation import ablate_pair, parse_targets
    from explorer.core.prompts import tokenize_pair
    at = page("pages/2_Ablation.py", targets="L1 attn", method="zero")
    text = " ".join(m.value for m in at.markdown)
    res = ablate_pair(demo_model, tokenize_pair(demo_model.tokenizer, DEMO_PAIR), parse_targets("L1 attn", demo_model.arch))
    corr = res.frame[res.frame.run == "corrupted"].iloc[0]
    assert f"corrupted run shifts by {corr['shift']:+.2f} from its own baseline" in text


def test_ablation_page_prompt_set_run(demo_model):
    at = page("pages/2_Ablation.py", targets="L1 attn", method="zero")
    form_numbers = at.number_input
    form_numbers[0].set_value(2)  # random sets
    form_numbers[1].set_value(20)  # headline pairs
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any(m.label == "Specificity" for m in at.metric)
    assert any("Status:" in m.value for m in at.markdown)


def test_pages_refuse_bad_input_with_one_message(demo_model):
    at = page("pages/2_Ablation.py", targets="L9H0")
    assert not at.exception and len(at.error) == 1 and "Layer 9" in at.error[0].value
    at = page("pages/6_Attention.py", heads="1.99")
    assert not at.exception and len(at.error) == 1 and "Head 99" in at.error[0].value


def sidebar_lds(at) -> tuple[float, float]:
    import re
    text = " ".join(c.value for c in at.sidebar.caption).replace("−", "-")
    m = re.search(r"LD_clean = ([-+]\d+\.\d+) · LD_corr = ([-+]\d+\.\d+)", text)
    assert m, f"no LDs in the sidebar: {text!r}; errors {[e.value for e in at.error]}"
    return float(m.group(1)), float(m.group(2))


def test_one_session_through_every_page_with_edits(demo_model):
    """The quick form of the browser journey: one AppTest session switches through all pages,
    edits the pair on Home and in another page's sidebar, changes page settings, and comes back."""
    from explorer.core.prompts import PromptPair
    pages = list(PAGE_NAMES)
    at = page("app.py")
    at.text_input(key="w.corrupted_answer").set_value("Grape").run()
    edited = PromptPair(**{**DEMO_PAIR.to_dict(), "corrupted_answer": "Grape"})
    ref = baseline(demo_model, edited)
    for name in pages[1:] + pages[:1]:
        at.switch_page(name).run()
        assert not at.exception, (name, at.exception)
        assert not at.error, (name, [e.value for e in at.error])
        if name != "pages/7_Weights.py":
            assert sidebar_lds(at) == pytest.approx((ref.ld_clean, ref.ld_corrupted), abs=2e-3), name
    # A page setting survives leaving the page; the sidebar editor edits the same pair as Home's.
    at.switch_page("pages/1_Patching.py").run()
    at.selectbox(key="w.patching.site").set_value("mlp_out").run()
    at.text_input(key="w.clean_answer").set_value("Peach").run()
    at.switch_page("pages/5_Logit_lens.py").run()
    at.switch_page("pages/1_Patching.py").run()
    assert at.selectbox(key="w.patching.site").value == "mlp_out"
    assert "mlp_out patched at each position" in at.get("vega_lite_chart")[0].proto.spec
    at.switch_page("app.py").run()
    assert at.text_input(key="w.clean_answer").value == "Peach"
    peach = baseline(demo_model, PromptPair(**{**edited.to_dict(), "clean_answer": "Peach"}))
    assert float(at.metric[0].value) == pytest.approx(peach.ld_clean, abs=1e-3)
    # An invalid edit is one message on every page; the next valid edit recovers.
    at.text_input(key="w.clean_answer").set_value("Peach Mango").run()
    for name in pages[1:]:
        at.switch_page(name).run()
        assert not at.exception
        # (Weights reads only weights, but its token list starts as the pair's answers.)
        assert len(at.error) == 1 and "2 tokens, not one" in at.error[0].value, name
    at.text_input(key="w.clean_answer").set_value("Mango").run()
    assert not at.error
    at.switch_page("pages/4_DLA.py").run()
    assert not at.error and sidebar_lds(at) == pytest.approx((ref.ld_clean, ref.ld_corrupted), abs=2e-3)


def test_a_model_switch_replaces_a_pair_that_does_not_fit_the_new_tokenizer(demo_model, tiny_model):
    """Switching model in a page's sidebar: the demo pair's words are unknown to a tiny random model's
    vocabulary, so that model's default pair is loaded with a notice; no traceback either way."""
    at = page("pages/5_Logit_lens.py")
    folder = tiny_model("llama").model_id
    at.selectbox(key="w.model_choice").set_value("other").run()
    at.text_input(key="w.model_path").set_value(folder).run()
    assert not at.exception
    assert any("default prompt pair" in i.value for i in at.info)
    assert at.query_params["model"] in (folder, [folder])
    # That default pair is natural language, unknown to the tiny vocabulary too: one clear message.
    assert len(at.error) == 1 and "vocabulary does not know" in at.error[0].value
    at.selectbox(key="w.model_choice").set_value("demo").run()
    assert not at.exception and not at.error
    assert at.query_params["model"] in ("demo", ["demo"])
    assert at.text_area(key="w.clean").value == DEMO_PAIR.clean
    ref = baseline(demo_model, DEMO_PAIR)
    assert sidebar_lds(at) == pytest.approx((ref.ld_clean, ref.ld_corrupted), abs=2e-3)


def test_tampered_page_settings_in_a_url_fall_back_to_defaults(demo_model):
    """Values a page does not offer (an unknown site, a layer or head out of range, a query position
    past the prompt) are ignored: the page opens on its defaults, with no error."""
    at = page("pages/1_Patching.py", site="resid_evil", positions="sideways", layer="99", direction="<script>")
    assert not at.exception and not at.error
    assert at.selectbox(key="w.patching.site").value == "resid_post"
    assert at.selectbox(key="w.patching.layer").value == "—"
    at = page("pages/4_DLA.py", layer="-3", head="1000", run="both")
    assert not at.exception and not at.error
    assert at.number_input(key="w.dla.layer").value == demo_model.arch.n_layers - 1
    assert at.number_input(key="w.dla.head").value == 0
    at = page("pages/6_Attention.py", pos="4000")
    assert not at.exception and not at.error
