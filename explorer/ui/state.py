"""Session state shared by all pages, mirrored into the URL so a view can be linked."""
from __future__ import annotations

import streamlit as st

from explorer.errors import ExplorerInputError
from explorer.prompts import PromptPair

PAIR_KEYS = ("clean", "corrupted", "clean_answer", "corrupted_answer")
MODEL_KEYS = ("model", "device", "dtype")
DEFAULTS = {"model": "demo", "device": "auto", "dtype": "float32"}
# Shown on first launch of the demo model (a set-completion pair, as in the seed study).
DEMO_PAIR = PromptPair(
    clean="Man has four fruits , Peach , Orange , Grape and Mango - 1 Peach 1 Orange 1 Grape and 1",
    corrupted="Man has four fruits , Peach , Orange , Grape and Mango - 1 Peach 1 Mango 1 Grape and 1",
    clean_answer="Mango", corrupted_answer="Orange", id="demo-set-completion", task="set_completion")
SMOLLM2_PAIR = PromptPair(
    clean="When Mary and John went to the store, John gave a drink to",
    corrupted="When Mary and John went to the store, Mary gave a drink to",
    clean_answer=" Mary", corrupted_answer=" John", id="smollm2-ioi", task="ioi")


def default_pair(model: str) -> PromptPair:
    return DEMO_PAIR if model == "demo" else SMOLLM2_PAIR


def init() -> None:
    """Fill session state from the URL once per session, then defaults."""
    if st.session_state.get("_initialised"):
        return
    params = st.query_params
    for key in MODEL_KEYS:
        st.session_state[key] = params.get(key, DEFAULTS[key])
    pair = default_pair(st.session_state["model"])
    for key in PAIR_KEYS:
        st.session_state[key] = params.get(key, getattr(pair, key))
    st.session_state["_initialised"] = True


def sync_url(extra: dict | None = None) -> None:
    """Write the current model and prompts (and page settings) into the query string."""
    wanted = {k: st.session_state[k] for k in MODEL_KEYS + PAIR_KEYS if k in st.session_state}
    wanted.update(extra or {})
    for key, value in wanted.items():
        if st.query_params.get(key) != str(value):
            st.query_params[key] = str(value)


def current_pair() -> PromptPair:
    init()
    return PromptPair(**{k: st.session_state[k] for k in PAIR_KEYS}, id="ui", task="")


def page_param(key: str, default, options=None):
    """A page setting read from the URL (for links into a view), validated against options."""
    value = st.query_params.get(key, default)
    if options is not None and value not in options:
        return default
    return value


@st.cache_resource(show_spinner="Loading model ...", max_entries=2)
def _load(model: str, device: str, dtype: str, trust_remote_code: bool):
    from explorer.models import load_model
    return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def current_model():
    """The shared LoadedModel (one per process; its lock serialises traces across sessions)."""
    init()
    return _load(st.session_state["model"], st.session_state["device"], st.session_state["dtype"],
                 bool(st.session_state.get("trust_remote_code", False)))


def current_tokenized_pair(lm):
    from explorer.prompts import tokenize_pair
    return tokenize_pair(lm.tokenizer, current_pair())


def show_error(exc: ExplorerInputError) -> None:
    st.error(str(exc), icon="⚠️")
