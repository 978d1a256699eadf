"""Attribution patching (first-order Taylor) beside exact patching, with a ranked candidate table."""
import streamlit as st

from explorer.analyses.attribution import ATTR_SITES, attribution_patching, compare_with_exact, spearman
from explorer.core.errors import ExplorerInputError
from explorer.surfaces.ui import charts, state, widgets


def main(lm, tp) -> None:
    try:
        res = attribution_patching(lm, tp)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()
    st.caption(f"{res.formula}. A linear screen: confirm with exact patching (below) and, for a circuit, on "
               "held-out pairs.")
    site = widgets.choice(st, "Site", "site", ATTR_SITES, default="head_out")
    if site == "head_out":
        table = res.table("head_out", per_position=False)
        estimate_chart = charts.heatmap(table, "head", "layer", "estimate",
                                        "Attribution estimate, head_out at all positions, clean → corrupted "
                                        "(denoise): recovery estimate", select=False)
    else:
        table = res.table(site)
        estimate_chart = charts.heatmap(table, "pos", "layer", "estimate",
                                        f"Attribution estimate, {site} at each position, denoise: recovery estimate",
                                        x_labels=tp.position_labels(), select=False)
    st.altair_chart(estimate_chart)
    widgets.export_buttons(table, f"attribution_{site}", {**res.meta(), "site": site,
                                                          "metric": "recovery estimate"}, chart=estimate_chart)

    st.subheader("Estimate vs exact patching")
    progress = widgets.progress_callback("Exact patching")
    merged = compare_with_exact(lm, tp, res, site, progress=progress)
    rho = spearman(merged["estimate"], merged["exact"])
    chart = charts.estimate_vs_exact(merged, "estimate", "exact", f"{site}: attribution estimate vs exact denoising "
                                     f"recovery (Spearman ρ = {rho:.3f})", color="layer")
    st.altair_chart(chart, width="stretch")
    widgets.export_buttons(merged, f"attribution_vs_exact_{site}", {**res.meta(), "site": site, "metric": "recovery",
                                                                    "spearman": rho}, chart=chart)
    st.metric("Spearman rank correlation", f"{rho:.3f}")

    st.subheader("Ranked head candidates")
    top_k = widgets.setting(st.slider, "Top k", "top_k", 5, parse=int, valid=lambda v: 1 <= v <= 20,
                            min_value=1, max_value=20)
    ranked = res.ranked_heads(20).merge(compare_with_exact(lm, tp, res, "head_out")[["layer", "head", "exact"]],
                                        on=["layer", "head"])
    st.dataframe(ranked[["head_label", "estimate", "exact"]], hide_index=True)
    targets = ", ".join(ranked["head_label"].head(top_k))
    st.page_link("pages/2_Ablation.py", label=f"Ablate the top {top_k}: {targets}",
                 query_params=state.url_params(**{"ablation.targets": targets}))


widgets.run_page("Attribution patching", "attribution", main)
