"""Logit lens: LD and top tokens per layer, both runs."""
import streamlit as st

from explorer.analyses.lens import logit_lens
from explorer.surfaces.ui import charts, widgets


def main(lm, tp) -> None:
    res = logit_lens(lm, tp)
    st.caption(res.formula)
    chart = charts.line(res.frame, "layer", "ld", "run", res.title, subtitle="layer −1 = embedding")
    st.altair_chart(chart, width="stretch")
    widgets.export_buttons(res.frame, "logit_lens", {**res.meta(), "site": "resid_post",
                                                     "positions": "last", "metric": "ld"}, chart=chart)
    st.dataframe(res.frame, hide_index=True, width="stretch")


widgets.run_page("Logit lens", "lens", main)
