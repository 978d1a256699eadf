"""Weights view: the extracted per-head matrices reproduce the model's own head outputs."""
import pytest
import torch

from explorer.core import engine
from tests.conftest import tol
from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import to_host
from explorer.analyses.weights import head_weights, ov_circuit, ov_token_matrix, qk_circuit


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "qwen3_5"])
def test_v_and_o_reproduce_head_output(tiny_model, family):
    """With attention fully on one position, z_h = W_V x; check W_V against the head output at pos 0
    (position 0 attends only to itself), and W_O against the attention output."""
    lm = tiny_model(family)
    layer = lm.arch.n_layers - 1
    ids = torch.tensor([[3, 7, 11, 5]])
    acts = engine.run(lm, ids, reads=[("head_out", layer), ("attn_out", layer)]).reads
    norm_in = None
    layer_mod = lm.sites.layer(lm.torch_model, layer)
    for name in ("input_layernorm", "ln_1"):
        norm_in = getattr(layer_mod, name, norm_in)
    pre = engine.run(lm, ids, reads=[("resid_pre", layer)]).reads
    x = to_host(norm_in(pre[("resid_pre", layer)])[0, 0])
    head = 1
    w = head_weights(lm, layer, head)
    bias = 0
    attn = lm.sites.mixer(lm.torch_model, layer)
    if family == "gpt2":
        bias = to_host(attn.c_attn.bias)[2 * lm.arch.d_model + head * lm.arch.head_dim:][: lm.arch.head_dim]
    elif family == "gpt_neox":
        bias = to_host(attn.query_key_value.bias).view(lm.arch.n_heads, -1)[head, 2 * lm.arch.head_dim:]
    elif getattr(attn.v_proj, "bias", None) is not None:
        kv = head // (lm.arch.n_heads // lm.arch.n_kv_heads)
        bias = to_host(attn.v_proj.bias)[kv * lm.arch.head_dim:(kv + 1) * lm.arch.head_dim]
    z = to_host(acts[("head_out", layer)][0, 0, head])
    if family == "qwen3_5":
        pytest.skip("gated attention multiplies z by a sigmoid gate; V alone does not give z")
    torch.testing.assert_close(w.v @ x + bias, z, atol=tol("check"), rtol=tol("check", fp32=1e-4))
    heads = to_host(acts[("head_out", layer)][0, 2])  # [head, d_head]
    o_all = sum(head_weights(lm, layer, h).o @ heads[h] for h in range(lm.arch.n_heads))
    proj_bias = getattr(lm.sites.o_proj(lm.torch_model, layer), "bias", None)
    torch.testing.assert_close(o_all + (to_host(proj_bias) if proj_bias is not None else 0),
                               to_host(acts[("attn_out", layer)][0, 2]), atol=tol("check"),
                               rtol=tol("check", fp32=1e-4))


def test_circuit_tables(tiny_model):
    lm = tiny_model("llama")
    ov = ov_circuit(lm, 1, 0, n_directions=3, k=4)
    assert len(ov) == 3 and ov["singular_value"].is_monotonic_decreasing
    qk = qk_circuit(lm, 1, 0, n_directions=2)
    assert len(qk) == 2
    m = ov_token_matrix(lm, 1, 0, ["w1", "w2", "w3"])
    assert len(m) == 9
    with pytest.raises(ExplorerInputError, match="linear attention"):
        head_weights(tiny_model("qwen3_5"), 0, 0)
