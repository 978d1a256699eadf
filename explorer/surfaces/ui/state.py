"""One state model per session: the model, the prompt pair and every page's settings.

They live in a store under a session-state key that no widget owns, because Streamlit deletes
a widget's state whenever a run does not draw that widget (any page change). Widgets are seeded
from the store on each run and write back through callbacks (explorer/surfaces/ui/widgets.py `bound`).

The URL mirrors the session: the model, the pair and every page setting that differs from its
default (as `page.name=value`), written once at the end of each run (`write_url`). The same
query string therefore serves every page, so sidebar navigation (which carries it over) adds one
browser history entry per page change, and a reload, a shared link, back/forward or a link from
another page reopens exactly that view. A URL is adopted only when it differs from the one this
session wrote last.
"""
from __future__ import annotations

from collections import OrderedDict

import streamlit as st

from explorer.core.errors import ExplorerInputError
from explorer.sources.models import allowed_model
from explorer.core.prompts import PromptPair

STORE = "_explorer_state"
PAIR_KEYS = ("clean", "corrupted", "clean_answer", "corrupted_answer")
MODEL_KEYS = ("model", "device", "dtype")
GLOBAL_KEYS = MODEL_KEYS + PAIR_KEYS
MODEL_CHOICES = ("demo", "smollm2")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")
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


# Per-session memory is bounded, so that many viewers of a shared app cannot exhaust it: each session
# keeps at most this many uploaded prompt sets (each at most MAX_PROMPT_SET_BYTES) and computed tables.
MAX_UPLOADED_SETS = 4
MAX_SESSION_RESULTS = 8


class BoundedCache(OrderedDict):
    """Keeps the `size` most recently used entries; the least recently used one goes first."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value

    def get_or_compute(self, key, compute):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return self.put(key, compute())


def default_pair(model: str) -> PromptPair:
    return DEMO_PAIR if model == "demo" else SMOLLM2_PAIR


class Store:
    """The session's state: global values, `page.name` settings and URL bookkeeping."""

    def __init__(self) -> None:
        self.values: dict = dict(DEFAULTS)
        self.values.update({k: getattr(DEMO_PAIR, k) for k in PAIR_KEYS})
        self.values.update(model_choice="demo", model_path="", trust_remote_code=False)
        self.page = "home"
        self.url_settings: dict[str, str] = {}  # `page.name` -> text: page settings that differ from default
        self.pending: dict[str, str] = {}       # settings a new URL brought, parsed when their page runs
        self.from_url: set[str] = set()         # settings a URL named: kept in the URL even at default
        self.last_written: dict[str, str] | None = None   # None: nothing written yet (a new session)
        self.check_pair_for_model = False   # the model changed: is the pair still valid for it?
        self.notice: str | None = None       # one message for the next run (e.g. the pair was replaced)
        self.form_keys: dict[str, str] = {}  # widget key -> store key, for this run's form widgets
        self.typed_models: set[str] = set()  # folders and hub ids typed in the sidebar (links may name them)
        self.uploaded_sets = BoundedCache(MAX_UPLOADED_SETS)   # name -> PromptSet, for this session only
        self.results = BoundedCache(MAX_SESSION_RESULTS)       # key -> a table computed for this session

    def pair(self) -> PromptPair:
        return PromptPair(**{k: self.values[k] for k in PAIR_KEYS}, id="ui", task="")

    def set_pair(self, pair: PromptPair) -> None:
        for key in PAIR_KEYS:
            self.values[key] = getattr(pair, key)

    def set_model(self, model: str) -> None:
        """Switch model; the sidebar's picker follows (a folder or hub id shows under "other")."""
        if not model:
            return
        if model != self.values["model"]:
            self.check_pair_for_model = True
        self.values["model"] = model
        known = model in MODEL_CHOICES
        self.values["model_choice"] = model if known else "other"
        self.values["model_path"] = "" if known else model

    def adopt(self, url: dict[str, str]) -> None:
        """Take the view a URL describes: its model, pair and page settings; a page setting the
        URL leaves out is back at its default (the URL only lists settings that differ from it)."""
        new_session = self.last_written is None
        model = url.get("model", "").strip() or DEFAULTS["model"]
        if "model" in url and not allowed_model(model, self.typed_models):
            self.notice = (f"This link names the model {model!r}, which the app does not load from a link (only "
                           "the bundled and prepared models, or a folder you typed in this session). If you trust "
                           "it, choose 'other' under Model in the sidebar and type it there.")
            url = {k: v for k, v in url.items() if k != "model"}
        if "model" in url:
            self.set_model(model)
            if new_session:
                self.check_pair_for_model = False
                self.set_pair(default_pair(self.values["model"]))
        for key, options in (("device", DEVICES), ("dtype", DTYPES)):
            if url.get(key) in options:
                self.values[key] = url[key]
        if any(key in url and url[key] != self.values[key] for key in PAIR_KEYS):
            self.check_pair_for_model = False   # a pair that came with the URL is the user's: never replace it
        for key in PAIR_KEYS:
            self.values[key] = url.get(key, self.values[key])
        for key in set(self.url_settings) - set(url):
            self.values.pop(key, None)
            del self.url_settings[key]
        self.pending = {k: v for k, v in url.items() if "." in k}


def type_model(text: str) -> None:
    """A folder or hub id the user typed: loaded, and from now on allowed in this session's links."""
    s = store()
    if text.strip():
        s.typed_models.add(text.strip())
        s.set_model(text.strip())


def store() -> Store:
    if STORE not in st.session_state:
        st.session_state[STORE] = Store()
    return st.session_state[STORE]


def begin_page(page: str) -> Store:
    """Start a run of `page`, adopting the URL if it is not the one this session wrote last
    (a reload, a shared link, browser back/forward, a link from another page). Sidebar navigation
    carries the last URL over unchanged, so it changes nothing; so does an empty URL."""
    s = store()
    s.page = page
    s.form_keys = {}   # the last run's form widgets were committed (if submitted) before this run
    url = {k: st.query_params.get(k) for k in st.query_params}
    if url and url != s.last_written:
        s.adopt(url)
    return s


def page_value(name: str, default, parse=str, valid=None):
    """This page's setting `name`: as a new URL gave it (if valid), else as stored, else `default`.
    `parse` turns URL text into a value; `valid(value)` says whether it may be used now."""
    s = store()
    key = f"{s.page}.{name}"
    if key in s.pending:
        try:
            value = parse(s.pending.pop(key))
        except (ValueError, TypeError):
            value = None
        if value is not None and (valid is None or valid(value)):
            s.values[key] = value
            s.from_url.add(key)
    if key not in s.values or (valid is not None and not valid(s.values[key])):
        s.values[key] = default
    return s.values[key]


def set_page_value(name: str, value) -> None:
    s = store()
    s.values[f"{s.page}.{name}"] = value


def as_text(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def publish(name: str, value, default) -> None:
    """Record this page setting for the URL. One at its default is left out (unless a URL named
    it), so that visiting a page changes the URL only when a setting does, and a link that names
    it lands on the URL it linked to (each URL change is a browser history entry)."""
    s = store()
    key = f"{s.page}.{name}"
    if as_text(value) == as_text(default) and key not in s.from_url:
        s.url_settings.pop(key, None)
    else:
        s.url_settings[key] = as_text(value)


def url_params_global() -> dict[str, str]:
    """The model and the pair as URL parameters."""
    s = store()
    return {k: str(s.values[k]) for k in GLOBAL_KEYS}


def url_params(**overrides) -> dict[str, str]:
    """The whole view as URL parameters; `overrides` (`page.name` keys) for links into another view."""
    s = store()
    # Settings a URL brought for pages that have not run since stay in it until they do.
    params = {**url_params_global(), **s.pending, **s.url_settings}
    params.update({k: as_text(v) for k, v in overrides.items()})
    return params


def write_url() -> None:
    """Write the whole view into the URL in one update (each update is one browser history entry)."""
    s = store()
    wanted = url_params()
    current = {k: st.query_params.get(k) for k in st.query_params}
    if current != wanted:
        st.query_params.from_dict(wanted)
    s.last_written = wanted


def current_pair() -> PromptPair:
    return store().pair()


def set_pair(pair: PromptPair) -> None:
    store().set_pair(pair)


@st.cache_resource(show_spinner="Loading model ...", max_entries=2)
def _load(model: str, device: str, dtype: str, trust_remote_code: bool):
    from explorer.sources.models import load_model
    return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def shared_model(model: str, device: str = "auto", dtype: str = "float32"):
    """A model another view names (a story step), from the same process-wide cache as the session's
    model; only the bundled and prepared models or a folder typed in this session, as for links."""
    if not allowed_model(model, store().typed_models):
        raise ExplorerInputError(f"This story names the model {model!r}, which the app does not load from a story "
                                 "(only the bundled and prepared models, or a folder you typed in this session).")
    return _load(model, device, dtype, False)


def current_model():
    """The shared LoadedModel (one per process; its lock serialises traces across sessions).
    After a model change, a pair that does not fit the new tokenizer is replaced by that model's
    default pair, with a notice saying so."""
    s = store()
    v = s.values
    lm = _load(v["model"], v["device"], v["dtype"], bool(v.get("trust_remote_code", False)))
    if s.check_pair_for_model:
        s.check_pair_for_model = False
        from explorer.core.prompts import tokenize_pair
        try:
            tokenize_pair(lm.tokenizer, s.pair(), lm.arch)
        except ExplorerInputError as exc:
            s.set_pair(default_pair(v["model"]))
            s.notice = (f"Loaded {v['model']}'s default prompt pair: the previous pair does not fit this "
                        f"model's tokenizer. {exc}")
    return lm


def current_tokenized_pair(lm):
    from explorer.core.prompts import tokenize_pair
    return tokenize_pair(lm.tokenizer, current_pair(), lm.arch)


def show_error(exc: ExplorerInputError) -> None:
    st.error(str(exc), icon="⚠️")
