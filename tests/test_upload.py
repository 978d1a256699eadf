"""Prompt sets uploaded in the app: bad lines reported by number while the rest load, filters, the
per-pair table, and the set offered by every prompt-set picker for the rest of the session."""
import json

import pytest
from streamlit.testing.v1 import AppTest

from explorer.analyses.dataset import pair_baselines
from explorer.core.prompts import MAX_PROMPT_SET_BYTES, load_prompt_set
from explorer.core.runtime import REPO_ROOT
from tests.conftest import TEST_DEVICE, TEST_DTYPE

TIMEOUT = 240


def open_page(path: str) -> AppTest:
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=TIMEOUT)
    at.query_params["device"] = TEST_DEVICE.split(":")[0]
    at.query_params["dtype"] = TEST_DTYPE
    if path != "app.py":
        at.switch_page(path)
    return at.run()


def jsonl_with_bad_lines() -> tuple[bytes, list]:
    """Six good pairs from a bundled set (two tasks, both categories) and four bad lines at known numbers."""
    good = load_prompt_set(REPO_ROOT / "prompts" / "demo_ioi.jsonl").pairs
    headline = [p for p in good if p.category == "headline"][:4]
    control = [p for p in good if p.category == "control"][:2]
    pairs = headline + control
    lines = [json.dumps({**p.to_dict(), "task": "ioi_a" if i % 2 else "ioi_b"}) for i, p in enumerate(pairs)]
    lines.insert(1, "{not json")                                                       # line 2
    lines.insert(4, json.dumps({"clean": "x", "corrupted": "y"}))                      # line 5
    lines.insert(6, json.dumps({**pairs[0].to_dict(), "category": "sideways"}))        # line 7
    lines.insert(8, "[1, 2]")                                                          # line 9
    return ("\n".join(lines) + "\n").encode(), pairs


def test_upload_reports_bad_lines_and_loads_the_rest(demo_model):
    data, pairs = jsonl_with_bad_lines()
    at = open_page("pages/8_Prompt_sets.py")
    assert not at.exception and not at.error
    at.file_uploader[0].set_value(("mine.jsonl", data, "application/jsonl")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    [warning] = [w.value for w in at.warning if "mine.jsonl" in w.value]
    assert "6 pair(s) loaded" in warning
    for number, problem in ((2, "not valid JSON"), (5, "missing or empty field(s): clean_answer, corrupted_answer"),
                            (7, "category must be"), (9, "expected a JSON object")):
        assert f"line {number}: {problem}" in warning, (number, warning)
    # The uploaded set is the one shown; its per-pair table is pair_baselines on its pairs.
    assert at.selectbox(key="w.prompt_sets.set").value == "uploaded: mine.jsonl"
    table = at.dataframe[0].value
    ref = pair_baselines(demo_model, pairs)
    assert list(table["id"]) == [p.id for p in pairs]
    assert table["ld_clean"].tolist() == pytest.approx(ref["ld_clean"].tolist(), abs=1e-4)
    assert table["ld_corrupted"].tolist() == pytest.approx(ref["ld_corrupted"].tolist(), abs=1e-4)

    # Filters by category and task.
    at.multiselect(key="w.prompt_sets.categories").set_value(["headline"]).run()
    assert set(at.dataframe[0].value["category"]) == {"headline"} and len(at.dataframe[0].value) == 4
    at.multiselect(key="w.prompt_sets.tasks").set_value(["ioi_a"]).run()
    table = at.dataframe[0].value
    assert set(table["task"]) == {"ioi_a"} and set(table["category"]) == {"headline"} and len(table) == 2

    # Later in the session, without the file: the set is offered by Home's picker and the sidebar's.
    at.file_uploader[0].set_value(None)
    at.switch_page("pages/5_Logit_lens.py").run()
    assert not at.exception
    sidebar = at.selectbox(key="w.lens.sidebar_set")
    assert sidebar.options[0] == "uploaded: mine.jsonl"
    sidebar.set_value("uploaded: mine.jsonl").run()
    picks = [s for s in at.sidebar.selectbox if s.key == "pick.sidebar_set"][0]
    picks.set_value(3).run()
    [b for b in at.sidebar.button if b.key == "use.sidebar_set"][0].click().run()
    assert not at.exception and not at.error
    at.switch_page("app.py").run()
    assert at.text_area(key="w.clean").value == pairs[3].clean
    assert at.selectbox(key="w.home.set_name").options[0] == "uploaded: mine.jsonl"


def test_upload_refuses_files_over_the_limit_and_non_utf8(demo_model):
    at = open_page("pages/8_Prompt_sets.py")
    at.file_uploader[0].set_value(("big.jsonl", b"\n" * (MAX_PROMPT_SET_BYTES + 1), "application/jsonl")).run()
    assert not at.exception and len(at.error) == 1 and "limited to" in at.error[0].value
    at.file_uploader[0].set_value(("latin.jsonl", "{\"clean\": \"caf\u00e9\"}".encode("latin-1"), "text/plain")).run()
    assert not at.exception and len(at.error) == 1 and "not UTF-8" in at.error[0].value
    at.file_uploader[0].set_value(("bad.jsonl", b"{oops\n", "text/plain")).run()
    assert not at.exception and len(at.error) == 1 and "no valid pairs" in at.error[0].value
    assert "line 1: not valid JSON" in at.error[0].value
    # None of them became a set.
    assert not any(o.startswith("uploaded: ") for o in at.selectbox(key="w.prompt_sets.set").options)


def test_a_session_keeps_its_latest_uploads_only(demo_model):
    from explorer.surfaces.ui.state import MAX_UPLOADED_SETS
    data, _ = jsonl_with_bad_lines()
    at = open_page("pages/8_Prompt_sets.py")
    for i in range(MAX_UPLOADED_SETS + 2):
        at.file_uploader[0].set_value((f"set{i}.jsonl", data, "application/jsonl")).run()
        assert not at.exception
    uploaded = [o for o in at.selectbox(key="w.prompt_sets.set").options if o.startswith("uploaded: ")]
    assert uploaded == [f"uploaded: set{i}.jsonl" for i in reversed(range(2, MAX_UPLOADED_SETS + 2))]
