"""Prompt-set level baselines: every pair's logit differences and top-1 correctness, batched."""
from __future__ import annotations

from collections import defaultdict

import pandas as pd
import torch

from explorer.core import budget, engine
from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.core.runtime import HOST

BATCH = 64


def last_logits(lm, sequences: list[tuple[int, ...]], progress=None, memory_budget_mb: float | None = None
                ) -> list[torch.Tensor]:
    """Last-position logits for many prompts; prompts of equal length share traced passes of at most
    BATCH rows, fewer where the memory budget (see explorer.core.budget) says so."""
    by_len = defaultdict(list)
    for i, seq in enumerate(sequences):
        by_len[len(seq)].append(i)
    out: list = [None] * len(sequences)
    memory = budget.budget_bytes(lm, memory_budget_mb)

    def run(chunk: list[int]):
        logits = engine.run(lm, torch.tensor([sequences[i] for i in chunk], device=HOST)).logits
        return chunk, logits

    done = 0
    for n_pos, idx in sorted(by_len.items()):
        step = budget.rows_per_pass(lm, n_pos, memory, BATCH)
        for start in range(0, len(idx), step):
            chunk = idx[start:start + step]
            for rows, logits in budget.halving_on_oom(lm, run, chunk, "a batch of prompts"):
                for i, row in zip(rows, logits):
                    out[i] = row
            done += len(chunk)
            if progress:
                progress(done / len(sequences), f"{done}/{len(sequences)} prompts")
    return out


def pair_baselines(lm, pairs: list[PromptPair], progress=None, memory_budget_mb: float | None = None
                   ) -> pd.DataFrame:
    """One row per pair: LD on both runs, whether each run's top-1 token is its answer."""
    if not pairs:
        raise ExplorerInputError("The prompt set has no pairs.")
    tps = [tokenize_pair(lm.tokenizer, p) for p in pairs]
    logits = last_logits(lm, [tp.clean_ids for tp in tps] + [tp.corrupted_ids for tp in tps], progress,
                         memory_budget_mb)
    rows = []
    for i, tp in enumerate(tps):
        clean, corr = logits[i], logits[len(tps) + i]
        a, b = tp.clean_answer_id, tp.corrupted_answer_id
        rows.append({"id": tp.pair.id, "task": tp.pair.task, "category": tp.pair.category,
                     "ld_clean": float(clean[a] - clean[b]), "ld_corrupted": float(corr[a] - corr[b]),
                     "clean_top1_correct": int(clean.argmax()) == a, "corrupted_top1_correct": int(corr.argmax()) == b,
                     "p_clean_answer": float(torch.softmax(clean, -1)[a])})
    return pd.DataFrame(rows)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task: top-1 accuracy over both runs, contrast accuracy (LD_clean > 0 > LD_corrupted),
    and the mean / extreme logit differences."""
    head = frame[frame["category"] == "headline"]
    g = head.groupby("task")
    return pd.DataFrame({
        "pairs": g.size(),
        "accuracy": g.apply(lambda d: (d["clean_top1_correct"].sum() + d["corrupted_top1_correct"].sum()) / (2 * len(d))),
        "contrast_accuracy": g.apply(lambda d: ((d["ld_clean"] > 0) & (d["ld_corrupted"] < 0)).mean()),
        "mean_ld_clean": g["ld_clean"].mean(), "min_ld_clean": g["ld_clean"].min(),
        "mean_ld_corrupted": g["ld_corrupted"].mean(), "max_ld_corrupted": g["ld_corrupted"].max(),
    }).reset_index()
