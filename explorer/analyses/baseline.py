"""Baseline numbers for one prompt pair: logit differences, answer probabilities, top tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from explorer.core.cache import get_activations
from explorer.core.errors import ExplorerInputError
from explorer.core.metrics import LD_FORMULA, logit_diff
from explorer.core.results import Result, make_spec
from explorer.core.prompts import PromptPair, TokenizedPair, show_token, tokenize_pair


@dataclass(frozen=True)
class BaselineResult(Result):
    _json_properties = ("span",)

    pair: TokenizedPair
    ld_clean: float
    ld_corrupted: float
    answers: pd.DataFrame  # run, answer, token, logit, prob
    top_tokens: pd.DataFrame  # run, rank, token, token_id, prob, logit
    formula: str = LD_FORMULA
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    @property
    def span(self) -> float:
        return self.ld_clean - self.ld_corrupted

    def to_dict(self) -> dict:
        return {"ld_clean": self.ld_clean, "ld_corrupted": self.ld_corrupted, "span": self.span,
                "formula": self.formula, "answers": self.answers.to_dict("records"),
                "top_tokens": self.top_tokens.to_dict("records")}


def run_logits(lm, tp: TokenizedPair) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits of the clean and corrupted runs (cached)."""
    clean, _ = get_activations(lm, tp.clean_ids, [])
    corrupted, _ = get_activations(lm, tp.corrupted_ids, [])
    return clean, corrupted


def pair_lds(lm, tp: TokenizedPair, require_span: bool = False) -> tuple[float, float]:
    """(LD_clean, LD_corr) of the cached runs. Recovery, damage and attribution estimates divide by
    LD_clean - LD_corr, so with require_span equal values are an error the user can act on."""
    clean, corrupted = run_logits(lm, tp)
    ld_clean, ld_corr = (float(logit_diff(x[None], tp.clean_answer_id, tp.corrupted_answer_id)[0])
                         for x in (clean, corrupted))
    if require_span and abs(ld_clean - ld_corr) < 1e-6:
        raise ExplorerInputError("The clean and corrupted runs have the same logit difference, so recovery is "
                                 "undefined; pick a pair whose answers differ in the model's preference.")
    return ld_clean, ld_corr


def baseline(lm, pair: PromptPair | TokenizedPair, top_k: int = 10) -> BaselineResult:
    tp = pair if isinstance(pair, TokenizedPair) else tokenize_pair(lm.tokenizer, pair, lm.arch)
    logits = dict(zip(("clean", "corrupted"), run_logits(lm, tp)))
    answer_rows, top_rows = [], []
    for run, lg in logits.items():
        probs = torch.softmax(lg.float(), -1)
        for which, tid in (("clean_answer", tp.clean_answer_id), ("corrupted_answer", tp.corrupted_answer_id)):
            answer_rows.append({"run": run, "answer": which, "token": show_token(lm.tokenizer, tid),
                                "logit": float(lg[tid]), "prob": float(probs[tid])})
        values, ids = probs.topk(top_k)
        for rank, (p, tid) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            top_rows.append({"run": run, "rank": rank, "token": show_token(lm.tokenizer, tid), "token_id": tid,
                             "prob": p, "logit": float(lg[tid])})
    ld = {run: float(logit_diff(lg, tp.clean_answer_id, tp.corrupted_answer_id)) for run, lg in logits.items()}
    spec = make_spec("baseline", lm, tp, top_k=top_k)
    return BaselineResult(tp, ld["clean"], ld["corrupted"], pd.DataFrame(answer_rows), pd.DataFrame(top_rows), spec=spec)
