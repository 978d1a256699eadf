"""DLA reconciles with the true logit difference; lens and attention match plain torch."""
import pytest
import torch

from explorer.analyses.attention import attention_from
from explorer.analyses.dla import FrozenNorm, dla, head_token_table, head_top_tokens
from explorer.core.errors import ExplorerInputError
from explorer.analyses.lens import logit_lens
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.core.runtime import to_host, to_model
from tests.conftest import HALF, model_ids, tol


def reconciles(res) -> bool:
    """The components sum to the true LD: to 1e-4 relative in float32, to tol('check') in half precision."""
    return abs(res.error) < tol("check") if HALF else res.relative_error < 1e-4

PAIR = PromptPair("w3 w7 w11 w5 w9 w2", "w3 w8 w11 w5 w9 w2", "w4", "w6")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "qwen3_5", "gemma2", "gemma3"])
@pytest.mark.parametrize("run", ["clean", "corrupted"])
def test_dla_reconciles(tiny_model, family, run):
    lm = tiny_model(family)
    tp = tokenize_pair(lm.tokenizer, PAIR)
    res = dla(lm, tp, run)
    assert res.norm_check_error < tol("check")
    assert reconciles(res), (res.ld_sum, res.ld_true)
    heads = res.frame[res.frame["kind"].isin(["head", "head_bias"])]
    if family.startswith("gemma"):
        assert heads.empty  # not additive: refused rather than wrong
    else:
        attn = res.frame[res.frame["kind"] == "attn"].set_index("layer")["dla"]
        per_layer = heads.groupby("layer")["dla"].sum()
        torch.testing.assert_close(torch.tensor(per_layer.values), torch.tensor(attn.loc[per_layer.index].values),
                                   atol=tol("check"), rtol=1e-4)


def test_dla_on_demo_model(demo_model):
    from explorer.surfaces.ui.state import DEMO_PAIR
    tp = tokenize_pair(demo_model.tokenizer, DEMO_PAIR)
    res = dla(demo_model, tp, "clean")
    assert reconciles(res)
    # Without the cached scale the components would not sum to LD (seed mistake 5).
    raw = res.frame[res.frame["kind"].isin(["embed", "attn", "mlp"])]
    assert abs(raw["dla"].sum() - res.ld_true) < tol("check", fp32=1e-3)


def test_frozen_norm_equals_module_at_its_own_point(tiny_model):
    for family in ("gpt2", "llama", "gemma2"):
        lm = tiny_model(family)
        x = torch.randn(lm.arch.d_model)
        norm = FrozenNorm(lm, x)
        with torch.no_grad():
            module = lm.sites.final_norm(lm.torch_model)(to_model(lm, x)[None])[0]
        torch.testing.assert_close(to_host(norm(x, with_bias=True)), to_host(module), atol=tol("check"),
                                   rtol=tol("check", fp32=1.3e-6))


def test_head_token_table_and_top_tokens(tiny_model):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    table = head_token_table(lm, tp, [(1, 2)], ["w4", "w6"])
    res = dla(lm, tp, "clean")
    head_dla = res.frame[(res.frame["kind"] == "head") & (res.frame["layer"] == 1) & (res.frame["head"] == 2)]["dla"].iloc[0]
    diff = table.set_index("token")["logit_contribution"]
    assert diff["w4"] - diff["w6"] == pytest.approx(head_dla, abs=tol("check"))
    top = head_top_tokens(lm, tp, 1, 2, k=3)
    assert len(top) == 6 and top[top.direction == "promoted"]["logit_contribution"].is_monotonic_decreasing
    with pytest.raises(ExplorerInputError, match="2 tokens"):
        head_token_table(lm, tp, [(1, 2)], ["w4 w6"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_last_layer_equals_model(tiny_model, family):
    lm = tiny_model(family)
    tp = tokenize_pair(lm.tokenizer, PAIR)
    res = logit_lens(lm, tp)
    with torch.no_grad():
        logits = to_host(lm.torch_model(model_ids(lm, tp.clean_ids)).logits[0, -1])
    last = res.frame[(res.frame.run == "clean") & (res.frame.layer == lm.arch.n_layers - 1)].iloc[0]
    assert last["ld"] == pytest.approx(float(logits[tp.clean_answer_id] - logits[tp.corrupted_answer_id]),
                                       abs=tol("ref"))


def test_attention_matches_hook_and_refuses_linear_layers(tiny_model):
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PAIR)
    res = attention_from(lm, tp, [(1, 3)], query_pos=4)
    got = {}
    def keep(module, args, output):
        got["p"] = output[1].detach().clone()
    h = lm.sites.mixer(lm.torch_model, 1).register_forward_hook(keep)
    with torch.no_grad():
        lm.torch_model(model_ids(lm, tp.clean_ids))
    h.remove()
    clean = res.frame[res.frame.run == "clean"]["weight"].to_numpy()
    torch.testing.assert_close(torch.tensor(clean, dtype=torch.float32), to_host(got["p"][0, 3, 4, :5]))
    hybrid = tiny_model("qwen3_5")
    with pytest.raises(ExplorerInputError, match="linear attention"):
        attention_from(hybrid, tokenize_pair(hybrid.tokenizer, PAIR), [(0, 1)])
    with pytest.raises(ExplorerInputError, match="out of range"):
        attention_from(lm, tp, [(1, 3)], query_pos=40)
