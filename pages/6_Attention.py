"""Attention patterns of chosen heads: the query x key heatmap per head, and one query row on both runs
(the query position defaults to where patching found the effect)."""
import altair as alt
import streamlit as st

from explorer.analyses.attention import attention_from, attention_grid
from explorer.core.errors import ExplorerInputError
from explorer.analyses.patching import parse_heads
from explorer.surfaces.ui import charts, state, widgets


def main(lm, tp) -> None:
    text = widgets.setting(st.text_input, "Heads (LAYER.HEAD, comma-separated)", "heads", f"{lm.arch.n_layers - 1}.0")
    n = len(tp.clean_ids)
    query = widgets.setting(st.slider, "Query position", "pos", n - 1, parse=int, valid=lambda p: 0 <= p < n,
                            min_value=0, max_value=n - 1,
                            help="Opened from the patching page, this is where that head's patching effect was "
                                 "largest.")
    st.caption(f"Query token: {tp.position_labels()[query]}. Patching effects at other positions are not explained "
               "by the last position's attention: check the patching view for where this head matters.")
    run = widgets.choice(st, "Run for the heatmaps", "run", ["clean", "corrupted"], horizontal=True, widget=st.radio)
    try:
        heads = parse_heads(text, lm.arch)
        n_run = len(tp.clean_ids if run == "clean" else tp.corrupted_ids)
        grid = attention_grid(lm, tp, heads, run, query if query < n_run else None)
        res = attention_from(lm, tp, heads, query)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()
    grid_chart = charts.attention_heatmaps(grid.frame, grid.title, grid.query_pos)
    st.altair_chart(grid_chart)
    widgets.export_buttons(grid.frame, f"attention_heatmaps_{run}", {"title": grid.title, "site": "attn_pattern",
                                                                     "positions": "all", "metric": "attention weight"},
                           chart=grid_chart)
    st.subheader(f"Query row {query}, both runs")
    chart = alt.Chart(res.frame).mark_bar().encode(
        x=alt.X("key_token:N", sort=None, title="key position:token (clean run tokens)",
                axis=alt.Axis(labelAngle=-60)),
        y=alt.Y("weight:Q", title="attention weight"), color="run:N", xOffset="run:N",
        row=alt.Row("head_label:N", title=None), tooltip=list(res.frame.columns),
    ).properties(width=900, height=180, title=res.title)
    st.altair_chart(chart)
    widgets.export_buttons(res.frame, f"attention_query{query}", {"title": res.title, "site": "attn_pattern",
                                                                  "positions": f"query {query}",
                                                                  "metric": "attention weight"}, chart=chart)
    st.dataframe(res.frame, hide_index=True)


widgets.run_page("Attention patterns", "attention", main)
