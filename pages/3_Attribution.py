"""Attribution patching (first-order Taylor) beside exact patching, with a ranked candidate table."""
import altair as alt
import streamlit as st

from explorer.attribution import ATTR_SITES, attribution_patching, compare_with_exact, spearman
from explorer.errors import ExplorerInputError
from explorer.ui import charts, state, widgets

lm, tp = widgets.start_page("Attribution patching")
try:
    res = attribution_patching(lm, tp)
except ExplorerInputError as exc:
    state.show_error(exc)
    st.stop()
st.caption(f"{res.formula}. A linear screen: confirm with exact patching (below) and, for a circuit, on held-out pairs.")
site = st.selectbox("Site", ATTR_SITES, index=ATTR_SITES.index(state.page_param("site", "head_out", ATTR_SITES)))
state.sync_url({"site": site})
if site == "head_out":
    table = res.table("head_out", per_position=False)
    st.altair_chart(charts.heatmap(table, "head", "layer", "estimate",
                                   "Attribution estimate, head_out at all positions, clean → corrupted (denoise): recovery estimate",
                                   select=False))
else:
    st.altair_chart(charts.heatmap(res.table(site), "pos", "layer", "estimate",
                                   f"Attribution estimate, {site} at each position, denoise: recovery estimate",
                                   x_labels=tp.position_labels(), select=False))

st.subheader("Estimate vs exact patching")
progress = widgets.progress_callback("Exact patching")
merged = compare_with_exact(lm, tp, res, site, progress=progress)
rho = spearman(merged["estimate"], merged["exact"])
scatter = alt.Chart(merged).mark_circle(size=60).encode(
    x=alt.X("exact:Q", title="exact recovery (activation patching)"), y=alt.Y("estimate:Q", title="attribution estimate"),
    color="layer:O", tooltip=list(merged.columns)).properties(
    title=f"{site}: attribution estimate vs exact denoising recovery (Spearman ρ = {rho:.3f})", height=360)
line = alt.Chart(merged).mark_line(color="grey", strokeDash=[4, 4]).encode(x="exact:Q", y="exact:Q")
st.altair_chart(scatter + line, width="stretch")
st.metric("Spearman rank correlation", f"{rho:.3f}")

st.subheader("Ranked head candidates")
top_k = st.slider("Top k", 1, 20, 5)
ranked = res.ranked_heads(20).merge(compare_with_exact(lm, tp, res, "head_out")[["layer", "head", "exact"]],
                                    on=["layer", "head"])
st.dataframe(ranked[["head_label", "estimate", "exact"]], hide_index=True)
targets = ", ".join(ranked["head_label"].head(top_k))
st.page_link("pages/2_Ablation.py", label=f"Ablate the top {top_k}: {targets}", query_params={"targets": targets})
