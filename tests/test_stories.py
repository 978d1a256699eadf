"""explorer/surfaces/stories.py and the Story page: steps saved from views, played, exported as one offline HTML file."""
import json
import re

import pytest
from streamlit.testing.v1 import AppTest

from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import REPO_ROOT
from explorer.surfaces import exports, stories
from explorer.surfaces.cli import main as cli_main
from explorer.surfaces.ui.state import DEMO_PAIR, STORE
from explorer.surfaces.views import View, render
from tests.conftest import TEST_DEVICE, TEST_DTYPE

TIMEOUT = 240
EXTERNAL = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", re.I)


def app(path: str | None = None, **query) -> AppTest:
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=TIMEOUT)
    at.query_params.update({"device": TEST_DEVICE.split(":")[0], "dtype": TEST_DTYPE, **query})
    if path:
        at.switch_page(path)
    return at.run()


def step_specs(page: str) -> list[dict]:
    """The Vega-Lite spec of every step in an exported story, by its JSON block."""
    blocks = re.findall(r'<script type="application/json" id="spec-(\d+)">(.*?)</script>', page, re.S)
    return [json.loads(text) for _, text in sorted(blocks, key=lambda b: int(b[0]))]


def check_offline(page: str) -> None:
    assert not EXTERNAL.search(page), EXTERNAL.search(page).group(0)
    assert "vegaEmbed" in page and "<script src" not in page


def test_round_trip_save_steps_from_views_play_them_and_export(demo_model, tmp_path):
    # Save three views as steps, the way a speaker does: open the view, write a title, add it.
    at = app("pages/1_Patching.py", **{"patching.site": "attn_out", "patching.positions": "each"})
    at.text_input(key="story_step_title").set_value("Attention output per position")
    at.text_area(key="story_step_narration").set_value("Layer 1 moves the answer to the last position.")
    at.button(key="story_add_step").click().run()
    at.switch_page("pages/6_Attention.py")
    at.query_params.update({"attention.heads": "1.4,1.5", "attention.pos": "21"})
    at.run()
    at.button(key="story_add_step").click().run()
    at.switch_page("pages/4_DLA.py").run()
    at.button(key="story_add_step").click().run()
    assert not at.exception
    saved = at.session_state[STORE].values["session_story"]
    assert [s["view"]["page"] for s in saved] == ["patching", "attention", "dla"]
    assert saved[0]["title"] == "Attention output per position"
    assert saved[0]["view"]["settings"] == {"site": "attn_out", "positions": "each"}
    assert saved[1]["view"]["settings"] == {"heads": "1.4,1.5", "pos": "21"}

    # Play them on the Story page: step by step, each computed live.
    at.switch_page("pages/9_Story.py")
    at.query_params.update({"story.name": "session", "story.step": "1"})
    at.run()
    assert not at.exception and not at.error
    titles = []
    for i in range(3):
        titles.append(at.header[0].value)
        assert len(at.get("vega_lite_chart")) == 1
        if i < 2:
            at.button(key="story_next").click().run()
    assert titles == ["Attention output per position", "Attention patterns", "Direct logit attribution"]
    assert at.button(key="story_next").disabled
    at.button(key="story_prev").click().run()
    assert at.header[0].value == "Attention patterns"

    # Download it, load it back, export it: every step's chart spec is in the file, no address at all.
    story = stories.parse_story(json.dumps({"title": "Mine", "steps": saved}), "saved.json")
    path = stories.save_story(story, tmp_path / "talk.json")
    assert stories.load_story(path) == story
    out = stories.export_html(story, tmp_path / "talk.html", load_model=lambda *a, **k: demo_model)
    page = out.read_text()
    check_offline(page)
    specs = step_specs(page)
    assert len(specs) == 3
    for step, spec in zip(story.steps, specs):
        shown = render(demo_model, step.view)
        expected = {k: v for k, v in exports.chart_dict(shown.chart).items() if k != "$schema"}
        assert spec == json.loads(json.dumps(expected))
        assert step.title in page and step.narration in page


def test_story_page_opens_a_bundled_story_at_the_step_in_the_url(demo_model):
    at = app("pages/9_Story.py", **{"story.name": "set_completion_demo.json", "story.step": "3"})
    assert not at.exception and not at.error
    assert at.header[0].value == "Residual stream, one position at a time"
    at.button(key="story_next").click().run()
    assert at.query_params["story.step"] in ("4", ["4"])
    at = app("pages/9_Story.py", **{"story.name": "set_completion_demo.json", "story.step": "99"})
    assert not at.exception and at.header[0].value == "The task and the baseline"   # out of range: step 1


def test_cli_exports_the_demo_story_offline_with_one_png_per_step(demo_model, tmp_path, capsys):
    out, pngs = tmp_path / "talk.html", tmp_path / "png"
    code = cli_main(["story", "export", "set_completion_demo.json", "--out", str(out), "--png-dir", str(pngs),
                     "--json"])
    assert code == 0, capsys.readouterr().err
    page = out.read_text()
    check_offline(page)
    story = stories.load_story(stories.STORIES_DIR / "set_completion_demo.json")
    assert len(step_specs(page)) == len(story.steps)
    assert sorted(p.read_bytes()[:8] for p in pngs.iterdir()) == [b"\x89PNG\r\n\x1a\n"] * len(story.steps)
    # The per-position steps outline the swapped token: the artefact is visible, not hidden.
    assert '"differs":true' in page.replace(" ", "")


def test_bundled_stories_load():
    names = {p.name: stories.load_story(p) for p in stories.bundled_stories()}
    assert set(names) >= {"ioi_smollm2.json", "set_completion_demo.json"}
    ioi = names["ioi_smollm2.json"]
    assert [s.view.page for s in ioi.steps] == ["home", "patching", "patching", "dla", "attention", "patching",
                                                "patching"]
    assert ioi.steps[5].view.settings["receiver"] == "23.0.q" and ioi.steps[0].view.model == "smollm2"
    assert ioi.steps[0].view.pair.clean_answer == " David"     # ioi-002 from the bundled set


def test_toml_and_json_save_and_append_round_trip(tmp_path):
    step = stories.Step("Baseline", 'Quotes " and \\ and ünïcode 🎤', View("home", "demo", DEMO_PAIR))
    for suffix in (".json", ".toml"):
        path = tmp_path / f"story{suffix}"
        stories.append_step(path, step, title="Talk")
        story = stories.append_step(path, stories.Step("DLA", "", View("dla", "demo", DEMO_PAIR, {"run": "corrupted"},
                                                                      panel="layers")))
        loaded = stories.load_story(path)
        assert loaded.to_dict() == story.to_dict() and len(loaded.steps) == 2 and loaded.title == "Talk"
        assert loaded.steps[0].narration == step.narration and loaded.steps[1].view.panel == "layers"


BAD_STORIES = {
    "not_json.json": ("{title: ", "not valid JSON"),
    "not_toml.toml": ("title = ", "not valid TOML"),
    "list.json": ("[]", "one object with a title and steps"),
    "no_steps.json": ('{"title": "T", "steps": []}', "steps must be a non-empty list"),
    "no_title.json": ('{"steps": [{"title": "a", "view": {"page": "home", "model": "demo", "prompt_set": '
                      '"demo_ioi.jsonl"}}]}', "title must be a non-empty string"),
    "bad_page.json": ('{"title": "T", "model": "demo", "prompt_set": "demo_ioi.jsonl", "steps": [{"title": "a", '
                      '"view": {"page": "nowhere"}}]}', "view page 'nowhere' is not one of"),
    "bad_panel.json": ('{"title": "T", "prompt_set": "demo_ioi.jsonl", "steps": [{"title": "a", "view": '
                       '{"page": "dla", "panel": "pie"}}]}', "no panel 'pie'"),
    "no_pair.json": ('{"title": "T", "steps": [{"title": "a", "view": {"page": "dla"}}]}', "give a pair"),
    "short_pair.json": ('{"title": "T", "steps": [{"title": "a", "view": {"page": "dla", "pair": {"clean": "x"}}}]}',
                        "pair needs non-empty strings for corrupted, clean_answer, corrupted_answer"),
    "bad_set.json": ('{"title": "T", "prompt_set": "../../etc/passwd", "steps": [{"title": "a", "view": '
                     '{"page": "dla"}}]}', "no bundled prompt set"),
    "bad_pair_id.json": ('{"title": "T", "prompt_set": "demo_ioi.jsonl", "pair_id": "nope", "steps": [{"title": "a", '
                         '"view": {"page": "dla"}}]}', "no pair with id 'nope'"),
    "extra_key.json": ('{"title": "T", "prompt_set": "demo_ioi.jsonl", "steps": [{"title": "a", "sound": 1, '
                       '"view": {"page": "dla"}}]}', "unknown key(s) 'sound'"),
    "bad_settings.json": ('{"title": "T", "prompt_set": "demo_ioi.jsonl", "steps": [{"title": "a", "view": '
                          '{"page": "dla", "settings": {"run": [1]}}}]}', "settings must map setting names"),
    "not_utf8.json": (b'{"title": "\xff"}', "not UTF-8"),
    "story.yaml": ("title: T", "a story is a .json or .toml file"),
}


@pytest.mark.parametrize("name", sorted(BAD_STORIES))
def test_a_bad_story_file_is_one_clear_error(name, tmp_path, capsys):
    text, message = BAD_STORIES[name]
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ExplorerInputError, match=re.escape(message)) as info:
        stories.load_story(path)
    assert name in str(info.value)
    assert cli_main(["story", "export", str(path), "--out", str(tmp_path / "out.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err


def test_several_problems_are_listed_in_one_message(tmp_path):
    path = tmp_path / "many.json"
    path.write_text('{"steps": [{"view": {"page": "x"}}, {"title": "b", "view": {"page": "dla", "panel": "q"}}]}')
    with pytest.raises(ExplorerInputError) as info:
        stories.load_story(path)
    message = str(info.value)
    assert message.startswith("many.json: 5 problem(s)") and "step 1" in message and "step 2" in message


def test_a_step_that_cannot_be_computed_names_the_step(demo_model, tmp_path):
    story = stories.Story("T", (stories.Step("Heads", "", View("attention", "demo", DEMO_PAIR, {"heads": "9.9"})),))
    with pytest.raises(ExplorerInputError, match=r"Step 1 \(Heads\)"):
        stories.export_html(story, tmp_path / "x.html", load_model=lambda *a, **k: demo_model)


def test_story_page_refuses_a_model_a_story_may_not_load(demo_model):
    at = app("pages/9_Story.py", **{"story.name": "set_completion_demo.json"})
    at.session_state[STORE].values["session_story"] = [
        {"title": "Elsewhere", "view": {"page": "home", "model": "/etc", "pair": {
            k: getattr(DEMO_PAIR, k) for k in ("clean", "corrupted", "clean_answer", "corrupted_answer")}}}]
    at.query_params["story.name"] = "session"
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "does not load from a story" in at.error[0].value
