"""A head's OV circuit through the unembedding and QK circuit through the embedding."""
import streamlit as st

from explorer.errors import ExplorerInputError
from explorer.ui import charts, state, widgets
from explorer.weights import ov_circuit, ov_token_matrix, qk_circuit

lm, _ = widgets.start_page("Weights: OV and QK circuits", needs_pair=False)
c1, c2 = st.columns(2)
layer = int(c1.number_input("Layer", 0, lm.arch.n_layers - 1, int(state.page_param("layer", lm.arch.n_layers - 1))))
head = int(c2.number_input("Head", 0, lm.arch.heads_in(layer) - 1, min(int(state.page_param("head", 0)), lm.arch.heads_in(layer) - 1)))
state.sync_url({"layer": layer, "head": head})
st.caption("OV: M = W_O·W_V; input side read through the embedding (layer input-norm gain), output side through the "
           "unembedding (final-norm gain). QK: W_Qᵀ·W_K through the embedding on both sides; rotary and q/k norms are not "
           "part of these matrices. A singular pair can flip sign together.")
try:
    st.subheader("OV circuit")
    st.dataframe(ov_circuit(lm, layer, head), hide_index=True, width="stretch")
    st.subheader("QK circuit")
    st.dataframe(qk_circuit(lm, layer, head), hide_index=True, width="stretch")
    pair = state.current_pair()
    tokens = st.text_input("Tokens for the OV token matrix", value=f"{pair.clean_answer},{pair.corrupted_answer}")
    matrix = ov_token_matrix(lm, layer, head, [t for t in tokens.split(",") if t])
    st.altair_chart(charts.heatmap(matrix, "output_token", "input_token", "logit",
                                   f"L{layer}H{head} OV: logit of each output token when attending to each input token",
                                   select=False))
except ExplorerInputError as exc:
    state.show_error(exc)
