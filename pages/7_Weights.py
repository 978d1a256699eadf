"""A head's OV circuit through the unembedding and QK circuit through the embedding."""
import streamlit as st

from explorer.core.errors import ExplorerInputError
from explorer.surfaces.ui import charts, state, widgets
from explorer.analyses.weights import ov_circuit, ov_token_matrix, qk_circuit


def main(lm, _tp) -> None:
    layer, head = widgets.head_picker(lm)
    st.caption("OV: M = W_O·W_V; input side read through the embedding (layer input-norm gain), output side through "
               "the unembedding (final-norm gain). QK: W_Qᵀ·W_K through the embedding on both sides; rotary and q/k "
               "norms are not part of these matrices. A singular pair can flip sign together.")
    try:
        st.subheader("OV circuit")
        st.dataframe(ov_circuit(lm, layer, head), hide_index=True, width="stretch")
        st.subheader("QK circuit")
        st.dataframe(qk_circuit(lm, layer, head), hide_index=True, width="stretch")
        pair = state.current_pair()
        tokens = widgets.setting(st.text_input, "Tokens for the OV token matrix",
                                 f"tokens:{pair.clean_answer},{pair.corrupted_answer}",
                                 f"{pair.clean_answer},{pair.corrupted_answer}", url=False)
        matrix = ov_token_matrix(lm, layer, head, [t for t in tokens.split(",") if t])
        ov_chart = charts.heatmap(matrix, "output_token", "input_token", "logit",
                                  f"L{layer}H{head} OV: logit of each output token when attending to each "
                                  "input token", select=False)
        st.altair_chart(ov_chart)
        widgets.export_buttons(matrix, f"ov_tokens_L{layer}H{head}", {"site": f"L{layer}H{head} OV", "metric": "logit"},
                               chart=ov_chart)
    except ExplorerInputError as exc:
        state.show_error(exc)


widgets.run_page("Weights: OV and QK circuits", "weights", main, needs_pair=False)
