"""Sharing a view: its run spec for exported files, a link to copy, and saving it as a step of the
session's story (played on the Story page, downloadable as JSON)."""
from __future__ import annotations

import json
from urllib.parse import urlencode

import streamlit as st

from explorer.core.errors import ExplorerInputError
from explorer.surfaces import exports, stories, views
from explorer.surfaces.ui import state

SESSION_STORY = "session_story"    # store key: the steps saved in this session, as step dicts
SESSION_TITLE = "session_story_title"


def page_settings(page: str | None = None) -> dict:
    """This page's settings as the store holds them now (name -> value), for the run spec."""
    s = state.store()
    prefix = f"{page or s.page}."
    return {k[len(prefix):]: v for k, v in s.values.items()
            if k.startswith(prefix) and isinstance(v, (str, int, float, bool, list))}


def view_spec(meta: dict | None = None) -> dict:
    """The run spec of the view on screen: model id and weight hash, the pair, the page and its
    settings, and what the page passed in `meta` (title, formula, site, positions, direction, metric)."""
    meta = dict(meta or {})
    model = meta.pop("model", None)
    if not isinstance(model, dict):
        try:
            model = state.current_model().describe()
        except ExplorerInputError:
            model = {"model_id": state.store().values["model"]}
    fields = {k: v for k, v in meta.items() if k not in ("pair", "page", "settings")}
    return exports.run_spec(model, state.current_pair(), state.store().page, page_settings(), **fields)


def view_link() -> str:
    """The URL of the view on screen (the page's address with the whole view as its query)."""
    base = (st.context.url or "").split("?")[0]
    return f"{base}?{urlencode(state.url_params())}"


def current_view() -> views.View:
    s = state.store()
    prefix = f"{s.page}."
    settings = {k[len(prefix):]: v for k, v in state.url_params().items() if k.startswith(prefix)}
    return views.View(s.page, s.values["model"], state.current_pair(), settings, device=s.values["device"],
                      dtype=s.values["dtype"])


def session_story() -> stories.Story | None:
    s = state.store()
    steps = s.values.get(SESSION_STORY) or []
    if not steps:
        return None
    return stories.parse_story(json.dumps({"title": s.values.get(SESSION_TITLE) or "My story",
                                                   "steps": steps}), "this session's story")


def add_step(title: str, narration: str) -> None:
    s = state.store()
    step = stories.Step(title.strip() or s.page, narration.strip(), current_view())
    s.values[SESSION_STORY] = list(s.values.get(SESSION_STORY) or []) + [step.to_dict()]


def share_box(container, title: str) -> None:
    """The sidebar's "Copy link to this view" and "Save this view as a story step"."""
    s = state.store()
    with container:
        with st.popover("Copy link to this view", icon=":material/link:", width="stretch"):
            st.caption("The link opens this page with this model, pair and settings.")
            st.code(view_link(), language=None, wrap_lines=True)
        if s.page not in views.PAGES:
            return
        with st.popover("Save this view as a story step", icon=":material/slideshow:", width="stretch"):
            step_title = st.text_input("Step title", value=title, key="story_step_title")
            narration = st.text_area("Narration (a sentence or two)", key="story_step_narration", height=90)
            if st.button("Add to this session's story", key="story_add_step"):
                add_step(step_title, narration)
                st.toast(f"Step {len(s.values[SESSION_STORY])} saved.")
            story = session_story()
            if story is not None:
                s.values[SESSION_TITLE] = st.text_input("Story title", value=story.title, key="story_title")
                story = session_story()
                st.caption(f"{len(story.steps)} step(s) saved.")
                st.download_button("Download the story (JSON)", stories.story_json(story), file_name="story.json",
                                   mime="application/json", key="story_download", on_click="ignore")
                st.page_link("pages/9_Story.py", label="Play it on the Story page", icon=":material/play_arrow:",
                             query_params={**state.url_params_global(), "story.name": "session", "story.step": "1"})
