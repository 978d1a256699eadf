"""Attention patterns of chosen heads from a chosen query position, both runs."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from explorer.core.cache import get_activations
from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import TokenizedPair


@dataclass(frozen=True)
class AttentionResult:
    frame: pd.DataFrame  # run, head_label, layer, head, query_pos, key_pos, key_token, weight
    query_pos: int

    @property
    def title(self) -> str:
        return f"Attention weights from query position {self.query_pos} (softmax pattern, eager attention)"


def attention_from(lm, tp: TokenizedPair, heads: list[tuple[int, int]], query_pos: int | None = None) -> AttentionResult:
    """Pattern rows of `heads` at `query_pos` (default: last). GQA heads read their shared K/V."""
    if not heads:
        raise ExplorerInputError("Pick at least one head.")
    for layer, head in heads:
        lm.arch.check_head(layer, head)
        lm.arch.check_softmax(layer, f"The attention view of head {layer}.{head}")
    rows = []
    layers = sorted({l for l, _ in heads})
    for run, ids, tokens in (("clean", tp.clean_ids, tp.clean_tokens), ("corrupted", tp.corrupted_ids, tp.corrupted_tokens)):
        q = len(ids) - 1 if query_pos is None else query_pos
        if not 0 <= q < len(ids):
            raise ExplorerInputError(f"Query position {q} is out of range for the {run} prompt (0..{len(ids) - 1}).")
        _, acts = get_activations(lm, ids, [("attn_pattern", l) for l in layers])
        for layer, head in heads:
            pattern = acts[("attn_pattern", layer)][head, q]  # [key]
            for k in range(q + 1):
                rows.append({"run": run, "head_label": lm.arch.head_label(layer, head), "layer": layer, "head": head,
                             "query_pos": q, "key_pos": k, "key_token": f"{k}:{tokens[k]}", "weight": float(pattern[k])})
    return AttentionResult(pd.DataFrame(rows), len(tp.clean_ids) - 1 if query_pos is None else query_pos)
