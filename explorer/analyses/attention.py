"""Attention patterns of chosen heads: one query row on both runs, or the whole query x key grid on one run."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from explorer.core.cache import get_activations
from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import TokenizedPair
from explorer.core.runtime import HOST


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


@dataclass(frozen=True)
class AttentionGridResult:
    """Every query x key weight of chosen heads on one run: the CircuitsVis-style picture."""
    frame: pd.DataFrame  # run, head_label, layer, head, query_pos, query_token, key_pos, key_token, weight
    run: str
    query_pos: int       # the row to mark (where patching found the effect); -1: none

    @property
    def title(self) -> str:
        return (f"Attention pattern, query × key, {self.run} run (softmax weights, eager attention; "
                "keys after the query are masked)")


def attention_grid(lm, tp: TokenizedPair, heads: list[tuple[int, int]], run: str = "clean",
                   query_pos: int | None = None) -> AttentionGridResult:
    """The whole causal pattern of each head in `heads` on the `run` prompt: one row per (head, query,
    key) with key <= query. Labels are 'pos:token' of that run's tokens, so the two axes read alike."""
    if run not in ("clean", "corrupted"):
        raise ExplorerInputError(f"run must be 'clean' or 'corrupted', not {run!r}.")
    if not heads:
        raise ExplorerInputError("Pick at least one head.")
    for layer, head in heads:
        lm.arch.check_head(layer, head)
        lm.arch.check_softmax(layer, f"The attention view of head {layer}.{head}")
    ids, tokens = (tp.clean_ids, tp.clean_tokens) if run == "clean" else (tp.corrupted_ids, tp.corrupted_tokens)
    n = len(ids)
    if query_pos is not None and not 0 <= query_pos < n:
        raise ExplorerInputError(f"Query position {query_pos} is out of range for the {run} prompt (0..{n - 1}).")
    _, acts = get_activations(lm, ids, [("attn_pattern", l) for l in sorted({l for l, _ in heads})])
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    query, key = torch.tril_indices(n, n, device=HOST)   # causal: key <= query
    parts = []
    for layer, head in heads:
        pattern = acts[("attn_pattern", layer)][head]  # [query, key]
        parts.append(pd.DataFrame({
            "run": run, "head_label": lm.arch.head_label(layer, head), "layer": layer, "head": head,
            "query_pos": query.numpy(), "query_token": [labels[q] for q in query.tolist()],
            "key_pos": key.numpy(), "key_token": [labels[k] for k in key.tolist()],
            "weight": pattern[query, key].float().numpy()}))
    return AttentionGridResult(pd.concat(parts, ignore_index=True), run, -1 if query_pos is None else query_pos)
