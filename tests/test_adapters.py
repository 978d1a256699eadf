"""Architecture zoo: every family's sites read through nnsight equal plain-torch hooks."""
import pytest
import torch

from explorer.core import engine
from explorer.core.adapters import LINEAR, SOFTMAX, architecture_for
from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import to_host
from explorer.sources.tiny import ZOO_FAMILIES
from tests.conftest import model_ids, tol

IDS = torch.tensor([[3, 7, 11, 5, 9, 2], [4, 8, 12, 6, 10, 2]])


def hook_reference(lm, ids):
    """Plain torch forward hooks on the same modules: the independent computation (on the model's device)."""
    model, sites, arch = lm.torch_model, lm.sites, lm.arch
    got, handles = {}, []

    def save(key, use_input=False):
        def hook(module, args, kwargs, output):
            if use_input:
                got[key] = (args[0] if args else next(iter(kwargs.values()))).detach().clone()
            else:
                got[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    for layer in range(arch.n_layers):
        handles.append(sites.layer(model, layer).register_forward_hook(save(("resid_pre", layer), True), with_kwargs=True))
        handles.append(sites.layer(model, layer).register_forward_hook(save(("resid_post", layer)), with_kwargs=True))
        handles.append(sites.mixer(model, layer).register_forward_hook(save(("attn_out", layer)), with_kwargs=True))
        handles.append(sites.o_proj(model, layer).register_forward_hook(save(("head_in", layer), True), with_kwargs=True))
        handles.append(sites.mlp(model, layer).register_forward_hook(save(("mlp_out", layer)), with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(model_ids(lm, ids.tolist())).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return logits, got


@pytest.mark.parametrize("family", ZOO_FAMILIES)
def test_zoo_sites_match_hooks(tiny_model, family):
    lm = tiny_model(family)
    arch = lm.arch
    reads = [(s, l) for l in range(arch.n_layers) for s in ("resid_pre", "head_out", "attn_out", "mlp_out", "resid_post")]
    out = engine.run(lm, IDS, reads=reads)
    logits, saved = out.logits, out.reads
    ref_logits, ref = hook_reference(lm, IDS)
    torch.testing.assert_close(logits, to_host(ref_logits), atol=tol("act"), rtol=tol("act"))
    for layer in range(arch.n_layers):
        for site in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
            torch.testing.assert_close(saved[(site, layer)], ref[(site, layer)], atol=tol("act"), rtol=tol("act"))
        # (b) per-head outputs through the output projection sum to the attention output
        heads = saved[("head_out", layer)]  # [batch, pos, head, d_head]
        assert heads.shape[2] == arch.heads_in(layer)
        o_proj = lm.sites.o_proj(lm.torch_model, layer)
        weight = o_proj.weight if o_proj.__class__.__name__ != "Conv1D" else o_proj.weight.T  # [d_model, heads*d_head]
        per_head = torch.einsum("bphd,mhd->bphm", heads, weight.view(weight.shape[0], heads.shape[2], -1))
        total = per_head.sum(2) + (o_proj.bias if o_proj.bias is not None else 0)
        torch.testing.assert_close(total, ref[("attn_out", layer)], atol=tol("act"), rtol=tol("act"))


@pytest.mark.parametrize("family", ZOO_FAMILIES)
def test_zoo_layer_kinds_match_config(tiny_model, family):
    lm = tiny_model(family)
    cfg = lm.torch_model.config
    arch = architecture_for(cfg)
    assert arch.n_layers == cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    for info in arch.layers_info:
        if family == "qwen3_5" and types[info.index] == "linear_attention":
            assert info.kind == LINEAR and info.n_heads == cfg.linear_num_value_heads
        else:
            assert info.kind == SOFTMAX and info.n_heads == cfg.num_attention_heads
    if family == "qwen3_5":
        assert {i.kind for i in arch.layers_info} == {LINEAR, SOFTMAX}


def test_attention_pattern_rows_sum_to_one(tiny_model):
    lm = tiny_model("llama")
    saved = engine.run(lm, IDS, reads=[("attn_pattern", 1)]).reads
    pattern = saved[("attn_pattern", 1)]  # [batch, head, query, key]
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
    assert torch.all(pattern.triu(1) == 0)  # causal


def test_linear_attention_layers_refuse_patterns(tiny_model):
    lm = tiny_model("qwen3_5")
    with pytest.raises(ExplorerInputError, match="linear attention"):
        engine.run(lm, IDS, reads=[("attn_pattern", 0)])
    assert lm.arch.head_label(0, 1) == "LinL0H1" and lm.arch.head_label(3, 1) == "L3H1"


def test_unknown_family_names_what_is_missing():
    class Cfg:
        model_type = "falcon_mamba"
    with pytest.raises(ExplorerInputError, match="not supported.*adapter naming"):
        architecture_for(Cfg())


def test_bad_layer_and_head_indices(tiny_model):
    arch = tiny_model("llama").arch
    with pytest.raises(ExplorerInputError, match="layers 0..1"):
        arch.check_layer(5)
    with pytest.raises(ExplorerInputError, match="heads 0..3"):
        arch.check_head(0, 4)
