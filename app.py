"""Circuit Explorer home: pick a model, edit the prompt pair, see the baseline."""
import streamlit as st

from explorer.errors import ExplorerInputError
from explorer.metrics import LD_FORMULA
from explorer.ui import state, widgets


def home(lm, _tp) -> None:
    st.caption("Activation patching, ablation, direct logit attribution, attention and logit lens on causal LMs, "
               "through nnsight. Everything below is computed live on the model chosen in the sidebar. "
               "The prompt pair is kept as you move between pages (each page's sidebar can edit it too), "
               "and the URL always holds the current view.")
    info = lm.describe()
    st.sidebar.caption(f"{info['family']} · {info['n_layers']} layers · {info['n_heads']} heads · d_model "
                       f"{info['d_model']} · {info['device']} · {info['dtype']} · weights {info['weight_hash'][:10]}")

    st.subheader("Prompt pair")
    widgets.prompt_set_picker(lm)
    widgets.pair_editor()

    try:
        from explorer.baseline import baseline
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
