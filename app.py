"""Circuit Explorer home: pick a model, edit the prompt pair, see the baseline."""
import streamlit as st

from explorer.core.errors import ExplorerInputError
from explorer.core.metrics import LD_FORMULA
from explorer.surfaces.ui import state, widgets


def home(lm, _tp) -> None:
    st.caption("Activation patching, ablation, direct logit attribution, attention and logit lens on causal LMs, "
               "through nnsight. Everything below is computed live on the model chosen in the sidebar. "
               "The prompt pair is kept as you move between pages (each page's sidebar can edit it too), "
               "and the URL always holds the current view.")
    s = state.store()
    with st.expander("Start here", expanded=not s.values.get("home.guide_seen")):
        pair_story = (
            "**The demo pair** is set completion, as in the seed study: four fruits are listed, then counted "
            "off. In the clean prompt Peach, Orange and Grape have been counted, so the one left is **Mango**; "
            "in the corrupted prompt Mango was counted in Orange's place (the one differing token, highlighted "
            "below), so the one left is **Orange**. "
            if s.values["model"] == "demo" else
            "**The pair** contrasts a clean and a corrupted prompt that differ in a token or two, with the "
            "answer each should get. ")
        st.markdown(
            pair_story + "LD = logit(clean answer) − logit(corrupted answer) at the last position.\n\n"
            "1. Check the **Baseline** below: the clean run should prefer its answer, the corrupted run the other.\n"
            "2. Open **Patching** in the sidebar: which layer and position carry the difference? Click a cell "
            "to see that layer's heads, then follow the links to the head's attention and DLA.\n"
            "3. **Ablation** knocks components out on both runs; **Attribution** screens every head at once.\n\n"
            "Edit the pair here or in any page's sidebar, or load one from a prompt set; the URL keeps the view, "
            "so you can share it.")
    s.values["home.guide_seen"] = True
    info = lm.describe()
    st.sidebar.caption(f"{info['family']} · {info['n_layers']} layers · {info['n_heads']} heads · d_model "
                       f"{info['d_model']} · {info['device']} · {info['dtype']} · weights {info['weight_hash'][:10]}")

    st.subheader("Prompt pair")
    widgets.prompt_set_picker(lm)
    widgets.pair_editor()

    try:
        from explorer.analyses.baseline import baseline
        tp = state.current_tokenized_pair(lm)
        with st.spinner("Running both prompts ..."):
            base = baseline(lm, tp)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()

    widgets.pair_baseline_caption(lm, tp)
    st.subheader("Tokens")
    widgets.token_table(tp)

    st.subheader("Baseline")
    m1, m2, m3 = st.columns(3)
    m1.metric("LD clean run", f"{base.ld_clean:+.3f}")
    m2.metric("LD corrupted run", f"{base.ld_corrupted:+.3f}")
    m3.metric("LD_clean − LD_corr", f"{base.span:+.3f}")
    st.caption(f"{LD_FORMULA}. Patching recovery and damage are normalised by LD_clean − LD_corr.")
    if base.span <= 0:
        st.warning("The clean run does not prefer the clean answer more than the corrupted run does "
                   "(LD_clean ≤ LD_corr): recovery numbers will be hard to read. Check the answers.")
    st.dataframe(base.answers, hide_index=True, width="stretch")
    c1, c2 = st.columns(2)
    for col, run in ((c1, "clean"), (c2, "corrupted")):
        col.markdown(f"**Top 10 next tokens, {run} run**")
        col.dataframe(base.top_tokens[base.top_tokens["run"] == run].drop(columns="run"), hide_index=True,
                      width="stretch")

    st.subheader("Analyses")
    cols = st.columns(4)
    for i, (path, label, icon, _) in enumerate(widgets.PAGES[1:]):
        cols[i % 4].page_link(path, label=label, icon=icon, query_params=state.url_params())


widgets.run_page("Circuit Explorer", "home", home, needs_pair=False, pair_in_sidebar=False)
