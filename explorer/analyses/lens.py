"""Logit lens: the final norm and unembedding applied to each layer's residual, both runs."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from explorer.core.cache import get_activations
from explorer.core.prompts import TokenizedPair, show_token
from explorer.core.runtime import to_host, to_model
from explorer.core.metrics import logit_diff
from explorer.core.results import Result, make_spec

LENS_FORMULA = "lens logits(l) = W_U · final_norm(resid_post[l][last]); LD(l) from those logits"


@dataclass(frozen=True)
class LensResult(Result):
    frame: pd.DataFrame  # run, layer, ld, p_clean_answer, p_corrupted_answer, top_tokens
    formula: str = LENS_FORMULA
    title: str = "Logit lens at the last position: LD per layer, clean and corrupted runs"
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)


def logit_lens(lm, tp: TokenizedPair, top_k: int = 5) -> LensResult:
    L = lm.arch.n_layers
    reads = [("resid_pre", 0)] + [("resid_post", l) for l in range(L)]
    norm = lm.sites.final_norm(lm.torch_model)
    head = lm.sites.unembed(lm.torch_model)
    rows = []
    for run, ids in (("clean", tp.clean_ids), ("corrupted", tp.corrupted_ids)):
        _, acts = get_activations(lm, ids, reads)
        stack = torch.stack([acts[("resid_pre", 0)][-1]] + [acts[("resid_post", l)][-1] for l in range(L)])
        with torch.no_grad():
            logits = to_host(head(norm(to_model(lm, stack))))  # [L+1, vocab]
        probs = torch.softmax(logits, -1)
        for i in range(L + 1):
            top = probs[i].topk(top_k).indices.tolist()
            rows.append({"run": run, "layer": i - 1, "site": "embed" if i == 0 else f"resid_post {i - 1}",
                         "ld": float(logit_diff(logits[i], tp.clean_answer_id, tp.corrupted_answer_id)),
                         "p_clean_answer": float(probs[i, tp.clean_answer_id]),
                         "p_corrupted_answer": float(probs[i, tp.corrupted_answer_id]),
                         "top_tokens": " ".join(show_token(lm.tokenizer, t) for t in top)})
    return LensResult(pd.DataFrame(rows), spec=make_spec("logit lens", lm, tp, position="last", top_k=top_k))
