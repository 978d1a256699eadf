"""The traced pass's building blocks for fast patching: a key/value prefix and packed rows."""
import pytest
import torch
from transformers import DynamicCache

from explorer.core import engine


def _prefix(kv, n: int):
    cache = DynamicCache()
    for index, layer in enumerate(kv.layers):
        cache.update(layer.keys[:, :, :n].contiguous(), layer.values[:, :, :n].contiguous(), index)
    return cache


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen3"])
def test_prefix_cache_and_packed_rows_equal_full_runs(tiny_model, family):
    lm = tiny_model(family)
    a = torch.tensor([[3, 9, 11, 5, 7, 2, 4]])
    b = torch.tensor([[3, 9, 11, 6, 7, 2, 4]])  # differs from a at position 3
    first = engine.run(lm, a, options=engine.PassOptions(return_cache=True))
    full_a, kv = first.logits, first.cache
    full_b = engine.run(lm, b).logits
    # positions 2.. of `a` over the cached keys/values of positions 0..1
    tail = engine.run(lm, a[:, 2:], options=engine.PassOptions(past_key_values=_prefix(kv, 2))).logits
    torch.testing.assert_close(tail, full_a, atol=1e-5, rtol=1e-5)
    # two rows packed into one sequence over a's prefix: b from position 3 and a from position 5
    positions = torch.tensor([3, 4, 5, 6, 5, 6])
    owner = torch.tensor([0, 0, 0, 0, 1, 1])
    first = torch.tensor([3, 5])[owner]
    ids = torch.cat([b[0, 3:], a[0, 5:]])[None]
    allowed = torch.cat([torch.arange(5)[None, :] < first[:, None],
                         (owner[:, None] == owner[None, :]) & (positions[None, :] <= positions[:, None])], 1)
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[None, None]
    options = engine.PassOptions(past_key_values=_prefix(kv, 5), keep=torch.tensor([3, 5]), attention_mask=mask,
                                 position_ids=positions[None])
    logits = engine.run(lm, ids, options=options).logits
    torch.testing.assert_close(logits[0], torch.cat([full_b, full_a]), atol=1e-5, rtol=1e-5)


def test_a_head_out_write_without_heads_writes_every_head(tiny_model):
    """Cell("head_out", layer, pos) with no head patches the whole attention output: the same as all heads in one patch."""
    from explorer.analyses.patching import Cell, patched_logit_diffs
    from explorer.core.prompts import PromptPair, tokenize_pair
    lm = tiny_model("llama")
    tp = tokenize_pair(lm.tokenizer, PromptPair("w3 w7 w11 w5 w9 w2", "w3 w8 w11 w5 w9 w2", "w4", "w6"))
    heads = range(lm.arch.heads_in(1))
    for pos in (2, None):
        whole = patched_logit_diffs(lm, tp, [(Cell("head_out", 1, pos),)], fast=False)
        each = patched_logit_diffs(lm, tp, [tuple(Cell("head_out", 1, pos, h) for h in heads)], fast=False)
        assert whole == pytest.approx(each, abs=1e-5)
