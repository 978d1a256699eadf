"""Path patching against the classic freeze-everything-else algorithm written with plain hooks."""
import pytest
import torch

from explorer.core.adapters import get_path
from explorer.core.errors import ExplorerInputError
from explorer.analyses.paths import parse_receiver, path_patch
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.sources.tiny import build_tiny_model
from tests.conftest import load_test_model, model_ids, tol

PAIR = PromptPair("w3 w7 w11 w5 w9 w2", "w3 w8 w11 w5 w9 w2", "w4", "w6")


@pytest.fixture(scope="module")
def three_layer(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            folder = build_tiny_model(family, tmp_path_factory.mktemp(f"{family}3"), seed=5, n_layers=3)
            cache[family] = load_test_model(str(folder))
        return cache[family]
    return get


def freeze_reference(lm, tp, sender, receiver):
    """Pass 1: corrupted run, sender head set to clean, every later attention/MLP output frozen to its
    corrupted value; record the receiver input. Pass 2: write only that into the corrupted run."""
    model, sites, arch = lm.torch_model, lm.sites, lm.arch
    clean_ids, corr_ids = model_ids(lm, tp.clean_ids), model_ids(lm, tp.corrupted_ids)
    ls, hs = sender
    n_heads = arch.n_heads
    saved = {}

    def grab(key, use_input=False):
        def hook(m, args, output):
            saved[key] = (args[0] if use_input else (output[0] if isinstance(output, tuple) else output)).detach().clone()
        return hook

    hooks = [sites.o_proj(model, ls).register_forward_hook(grab("z_clean", True))]
    with torch.no_grad():
        model(clean_ids)
    for h in hooks:
        h.remove()
    hooks = []
    for j in range(arch.n_layers):
        hooks.append(sites.mixer(model, j).register_forward_hook(grab(("attn", j))))
        hooks.append(sites.mlp(model, j).register_forward_hook(grab(("mlp", j))))
    with torch.no_grad():
        model(corr_ids)
    for h in hooks:
        h.remove()

    def set_sender(m, args):
        x = args[0].clone()
        x.view(*x.shape[:2], n_heads, -1)[:, :, hs] = saved["z_clean"].view(*x.shape[:2], n_heads, -1)[:, :, hs]
        return (x,)

    def freeze(key):
        def hook(m, args, output):
            if isinstance(output, tuple):
                return (saved[key],) + tuple(output[1:])
            return saved[key]
        return hook

    end = arch.n_layers if receiver == ("logits",) else receiver[0]
    hooks = [sites.o_proj(model, ls).register_forward_pre_hook(set_sender)]
    for j in range(ls, end):
        if j > ls:
            hooks.append(sites.mixer(model, j).register_forward_hook(freeze(("attn", j))))
        hooks.append(sites.mlp(model, j).register_forward_hook(freeze(("mlp", j))))
    if receiver != ("logits",):
        path, chunks, index = sites.qkv_slot(*receiver)
        proj = get_path(sites.layer(model, receiver[0]), path)
        hooks.append(proj.register_forward_hook(grab("receiver_in")))
    with torch.no_grad():
        logits = model(corr_ids).logits[0, -1]
    for h in hooks:
        h.remove()
    if receiver != ("logits",):
        def write(m, args, output):
            out = output.clone()
            out.view(*out.shape[:2], chunks, -1)[:, :, index] = saved["receiver_in"].view(*out.shape[:2], chunks, -1)[:, :, index]
            return out
        h = proj.register_forward_hook(write)
        with torch.no_grad():
            logits = model(corr_ids).logits[0, -1]
        h.remove()
    return float(logits[tp.clean_answer_id] - logits[tp.corrupted_answer_id])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen3"])
@pytest.mark.parametrize("receiver", [("logits",), (2, 1, "q"), (2, 3, "k"), (2, 0, "v"), (1, 2, "v")])
def test_path_patching_matches_freezing_reference(three_layer, family, receiver):
    lm = three_layer(family)
    tp = tokenize_pair(lm.tokenizer, PAIR)
    res = path_patch(lm, tp, receiver)
    for row in res.frame.itertuples():
        ref = freeze_reference(lm, tp, (row.layer, row.head), receiver)
        assert row.ld_patched == pytest.approx(ref, abs=tol("ref")), (row.head_label, receiver)


def test_receiver_parsing_and_errors(three_layer):
    lm = three_layer("llama")
    assert parse_receiver("logits", lm.arch) == ("logits",)
    assert parse_receiver("2.1.q", lm.arch) == (2, 1, "q")
    assert parse_receiver("L2H3 k", lm.arch) == (2, 3, "k")
    with pytest.raises(ExplorerInputError, match="Head 9"):
        parse_receiver("2.9.q", lm.arch)
    tp = tokenize_pair(lm.tokenizer, PAIR)
    with pytest.raises(ExplorerInputError, match="q, k or v"):
        path_patch(lm, tp, (2, 1, "z"))
    with pytest.raises(ExplorerInputError, match="not before"):
        path_patch(lm, tp, (1, 1, "q"), senders=[(2, 0)])
