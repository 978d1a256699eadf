"""Direct logit attribution with the cached final-norm scale and its reconciliation."""
import streamlit as st

from explorer.analyses.dla import dla, head_token_table, head_top_tokens
from explorer.core.errors import ExplorerInputError
from explorer.surfaces.ui import charts, state, widgets


def main(lm, tp) -> None:
    run = widgets.choice(st, "Run", "run", ["clean", "corrupted"], horizontal=True, widget=st.radio)
    try:
        res = dla(lm, tp, run)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()
    st.caption(res.formula)
    c1, c2, c3 = st.columns(3)
    c1.metric("True LD", f"{res.ld_true:+.4f}")
    c2.metric("Sum of components", f"{res.ld_sum:+.4f}")
    c3.metric("Reconciliation error", f"{res.error:+.2e}", help=f"relative {res.relative_error:.1e}")
    if res.relative_error > 1e-3:
        st.warning("The components do not sum to the true LD; this model's final norm is not reproduced by the "
                   "linearisation.")
    layers = res.layers()
    layers_chart = charts.dla_components(layers, res.title + ": embedding, attention and MLP per layer")
    st.altair_chart(layers_chart, width="stretch")
    meta = {**res.meta(), "ld_true": res.ld_true, "ld_sum": res.ld_sum, "positions": "last", "metric": "dla"}
    widgets.export_buttons(layers, f"dla_layers_{run}", meta, chart=layers_chart)
    heads = res.heads()
    if heads.empty:
        st.info("Per-head DLA is not additive for this family (the attention output is normalised before the "
                "residual add), so only the per-layer view is shown.")
        widgets.stop()
    heads_chart = charts.heatmap(heads, "head", "layer", "dla", res.title + ": per head", select=False)
    st.altair_chart(heads_chart)
    widgets.export_buttons(heads, f"dla_heads_{run}", meta, chart=heads_chart)
    widgets.attention_link(st, lm, res.top_heads(3), tp.n_pos - 1,
                           "top |DLA| heads; DLA reads the last position")

    st.subheader("One head")
    layer, head = widgets.head_picker(lm)
    tokens_text = widgets.setting(st.text_input, "Token list for the per-head token table (comma-separated)",
                                  f"tokens:{tp.pair.clean_answer},{tp.pair.corrupted_answer}",
                                  f"{tp.pair.clean_answer},{tp.pair.corrupted_answer}", url=False)
    try:
        table = head_token_table(lm, tp, [(layer, head)], [t for t in tokens_text.split(",") if t], run)
        st.altair_chart(charts.token_bars(table, "logit_contribution", f"{lm.arch.head_label(layer, head)}: direct "
                                          f"contribution to each token's logit ({run} run)"), width="stretch")
        st.dataframe(head_top_tokens(lm, tp, layer, head, run), hide_index=True)
    except ExplorerInputError as exc:
        state.show_error(exc)


widgets.run_page("Direct logit attribution", "dla", main)
