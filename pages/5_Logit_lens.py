"""Logit lens: LD and top tokens per layer, both runs."""
import streamlit as st

from explorer.lens import logit_lens
from explorer.ui import charts, state, widgets

st.set_page_config(page_title="Logit lens · Circuit Explorer", layout="wide")
state.init()
widgets.model_sidebar()
st.title("Logit lens")
lm = widgets.load_model_or_stop()
tp = widgets.tokenized_pair_or_stop(lm)
res = logit_lens(lm, tp)
st.caption(res.formula)
st.altair_chart(charts.line(res.frame, "layer", "ld", "run", res.title, subtitle="layer −1 = embedding"), width="stretch")
st.dataframe(res.frame, hide_index=True, width="stretch")
