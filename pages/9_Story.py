"""Plays a story for a talk: one step at a time, full width, large type, controls tucked away."""
import html

import streamlit as st

from explorer.core.errors import ExplorerInputError
from explorer.surfaces import exports, stories, views
from explorer.surfaces.ui import sharing, state, widgets

SESSION = "session"
UPLOADED = "uploaded"
PRESENTING_CSS = """<style>
[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], [data-testid="stHeader"],
[data-testid="stToolbar"], h1#story {display: none !important;}
[data-testid="stMainBlockContainer"] {max-width: 100%; padding: 1rem 3rem 2rem;}
</style>"""
LARGE_TYPE_CSS = """<style>
.story-title {font-size: 1.3rem; color: #666;}
.story-narration {font-size: 1.6rem; line-height: 1.45; max-width: 70rem; margin-bottom: 1rem;}
[data-testid="stMain"] h2 {font-size: 2.6rem;}
</style>"""


@st.cache_resource(show_spinner="Computing this step ...", max_entries=64)
def rendered_step(model_key: str, view_key: str, _lm, _view: views.View) -> views.Rendered:
    """A step's chart, kept per model and view for every session (a talk replays its steps often)."""
    return views.render(_lm, _view)


def render(view: views.View, lm=None) -> views.Rendered:
    lm = lm or state.shared_model(view.model, view.device, view.dtype)
    return rendered_step(f"{lm.model_id}:{lm.weight_hash}:{lm.dtype}:{lm.device}", view.key(), lm, view)


def story_choices() -> dict[str, str]:
    """Label -> story source: the bundled files, this session's saved steps, an uploaded file."""
    choices = {p.name: p.name for p in stories.bundled_stories()}
    if state.store().values.get(sharing.SESSION_STORY):
        choices[SESSION] = "this session's story"
    choices[UPLOADED] = "upload a story file"
    return choices


def load(name: str):
    if name == SESSION:
        return sharing.session_story()
    if name == UPLOADED:
        raw = state.store().values.get("story_upload")
        return stories.parse_story(raw[1], raw[0], toml=raw[0].endswith(".toml")) if raw else None
    return stories.load_story(stories.STORIES_DIR / name)


def controls(choices: dict[str, str]) -> tuple[str, bool]:
    """Story choice, upload and presenter mode, in one collapsed expander (out of the audience's way)."""
    with st.expander("Choose or upload a story; presenter mode", expanded=False):
        name = widgets.choice(st, "Story", "name", list(choices), format_func=choices.get)
        if name == UPLOADED:
            up = st.file_uploader("Story file (.json or .toml)", type=["json", "toml"], key="story_file")
            if up is not None and up.size > stories.MAX_BYTES:
                st.error(f"{up.name} is {up.size} bytes; a story file is at most {stories.MAX_BYTES}.")
            elif up is not None:
                state.store().values["story_upload"] = (up.name, up.getvalue())
        present = widgets.setting(st.toggle, "Presenting (hide the sidebar and the toolbar)", "present", True,
                                  parse=lambda v: v == "True", valid=lambda v: isinstance(v, bool))
    return name, present


def go_to(step: int) -> None:
    state.store().values["story.step"] = step


def main(_lm, _tp) -> None:
    st.markdown(LARGE_TYPE_CSS, unsafe_allow_html=True)
    choices = story_choices()
    name, present = controls(choices)
    if present:
        st.markdown(PRESENTING_CSS, unsafe_allow_html=True)
    try:
        story = load(name)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()
    if story is None:
        st.info("Upload a story file above, or save views as steps with the sidebar's 'Save this view as a story "
                "step' on any page.")
        widgets.stop()
    n = len(story.steps)
    # The step is in the URL (a link opens that step); the buttons below move it, so no widget owns it.
    index = state.page_value("step", 1, parse=int, valid=lambda v: isinstance(v, int) and 1 <= v <= n)
    state.publish("step", index, 1)
    step = story.steps[index - 1]

    st.markdown(f"<div class='story-title'>{html.escape(story.title)} · step {index} of {n}</div>",
                unsafe_allow_html=True)
    st.header(step.title, anchor=False)
    if step.narration:
        st.markdown(f"<div class='story-narration'>{html.escape(step.narration)}</div>", unsafe_allow_html=True)
    try:
        shown = render(step.view)
    except ExplorerInputError as exc:
        state.show_error(exc)
        shown = None
    if shown is not None:
        st.altair_chart(shown.chart)
        st.caption(f"{shown.caption}  \n{exports.spec_line(shown.spec)}")

    prev_col, info_col, next_col = st.columns([1, 4, 1])
    prev_col.button("← Previous", on_click=go_to, args=(index - 1,), disabled=index == 1, shortcut="Left",
                    key="story_prev", width="stretch")
    next_col.button("Next →", on_click=go_to, args=(index + 1,), disabled=index == n, shortcut="Right",
                    key="story_next", width="stretch")
    info_col.page_link(step.view.page_path(), label="Open this step live in the app", icon=":material/open_in_new:",
                       query_params=step.view.url_params())
    if shown is not None:
        try:   # the models are looked up here: the download's callable runs outside this session's run
            models = [state.shared_model(s.view.model, s.view.device, s.view.dtype) for s in story.steps]
        except ExplorerInputError:
            return
        st.download_button("Download the whole story as one HTML file", lambda: story_file(story, models),
                           file_name="story.html", mime="text/html", on_click="ignore", key="story_html")


def story_file(story, models) -> str:
    """The story as the CLI exports it, from this process's models and cached steps."""
    return stories.story_html(story, [render(s.view, lm) for s, lm in zip(story.steps, models)])


widgets.run_page("Story", "story", main, needs_pair=False, pair_in_sidebar=False)
