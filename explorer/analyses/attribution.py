"""Attribution patching: a first-order Taylor estimate of activation patching for every site.

estimate(site) = (a_clean - a_corr) · dLD/da, the gradient taken on the corrupted run,
divided by (LD_clean - LD_corr) so it reads like recovery. One forward and one
backward pass on the corrupted run give every layer, position and head at once. It is
a screen: the page always shows it beside exact patching (seed mistake 9).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from explorer.core import budget, engine
from explorer.analyses.baseline import pair_lds
from explorer.core.cache import get_activations
from explorer.core.errors import ExplorerInputError
from explorer.core.results import Result, make_spec, nullable_ints
from explorer.core.prompts import TokenizedPair
from explorer.core.runtime import HOST, to_model

ATTRIBUTION_FORMULA = "estimate = (a_clean − a_corr) · ∂LD/∂a at the corrupted run, / (LD_clean − LD_corr)"
ATTR_SITES = ("resid_pre", "attn_out", "mlp_out", "head_out")


@dataclass(frozen=True)
class AttributionResult(Result):
    frame: pd.DataFrame  # site, layer, pos, head, estimate  (head_out rows per position; pos <NA>: summed over positions)
    ld_clean: float
    ld_corrupted: float
    formula: str = ATTRIBUTION_FORMULA
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    def table(self, site: str, per_position: bool = True) -> pd.DataFrame:
        f = self.frame[self.frame["site"] == site]
        if site == "head_out":
            return f[f["pos"].notna() if per_position else f["pos"].isna()].reset_index(drop=True)
        return f.reset_index(drop=True)

    def ranked_heads(self, top: int = 20) -> pd.DataFrame:
        f = self.table("head_out", per_position=False)
        return f.reindex(f["estimate"].abs().sort_values(ascending=False).index).head(top).reset_index(drop=True)


def _read_groups(lm, n_pos: int, reads: list[tuple[str, int]], memory_budget_mb: float | None) -> list[list]:
    """Reads in groups of whole layers, one forward and backward pass each, so that the autograd graph
    plus the gradients kept for a group fit the memory budget (one group when everything fits)."""
    memory = budget.budget_bytes(lm, memory_budget_mb)
    graph = n_pos * budget.token_bytes(lm, n_pos, grad=True)
    per_read = n_pos * lm.arch.d_model * torch.finfo(lm.torch_model.dtype).bits // 8 * 2  # activation + gradient
    per_layer = per_read * max(1, len(reads) // lm.arch.n_layers)
    layers = max(1, int((memory - graph) // per_layer)) if memory > graph else 1
    groups: dict[int, list] = {}
    for read in reads:
        groups.setdefault(read[1] // layers, []).append(read)
    return list(groups.values())


def attribution_patching(lm, tp: TokenizedPair, sites=ATTR_SITES, memory_budget_mb: float | None = None
                         ) -> AttributionResult:
    """Every site's estimate from forward and backward passes on the corrupted run: one pass when the
    memory budget (memory_budget_mb, else explorer.core.budget's default) holds every layer's gradients,
    else groups of layers."""
    tp.require_same_length("Attribution patching per position")
    for site in sites:
        if site not in ATTR_SITES:
            raise ExplorerInputError(f"Attribution supports {', '.join(ATTR_SITES)}, not {site!r}.")
    L = lm.arch.n_layers
    order = {s: i for i, s in enumerate(("resid_pre", "head_out", "attn_out", "mlp_out"))}
    reads = sorted(((s, l) for l in range(L) for s in sites), key=lambda r: (r[1], order[r[0]]))
    _, clean = get_activations(lm, tp.clean_ids, reads)
    ld_clean, ld_corr = pair_lds(lm, tp, require_span=True)
    span = ld_clean - ld_corr
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    ids = to_model(lm, torch.tensor([list(tp.corrupted_ids)], device=HOST))
    rows = []
    for group in _read_groups(lm, tp.n_pos, reads, memory_budget_mb):
        run = lambda part: engine.gradients(lm, ids, part, answers)  # noqa: E731
        for found in budget.halving_on_oom(lm, run, group, "attribution patching"):
            for (site, layer), (corr_act, grad) in found.items():
                rows += _estimates(lm, site, layer, clean[(site, layer)], corr_act, grad, span)
    rows.sort(key=lambda r: (r["layer"], order[r["site"]]))  # the frame's order does not depend on the groups
    frame = nullable_ints(pd.DataFrame(rows))
    diff = set(tp.differing_positions)
    frame["differs"] = frame["pos"].isin(diff)
    spec = make_spec("attribution patching", lm, tp, sites=list(sites), direction="denoise", metric="estimate")
    return AttributionResult(frame, ld_clean, ld_corr, spec=spec)


def _estimates(lm, site: str, layer: int, clean_act, corr_act, grad, span: float) -> list[dict]:
    delta = to_model(lm, clean_act, torch.float32) - corr_act[0].float().view(clean_act.shape)
    g = grad[0].float().view(delta.shape)
    contrib = (delta * g)  # [pos, d] or [pos, head, d_head]
    rows = []
    if site == "head_out":
        per = contrib.sum(-1) / span  # [pos, head]
        for head in range(per.shape[1]):
            label = lm.arch.head_label(layer, head)
            rows.append({"site": site, "layer": layer, "pos": None, "head": head, "head_label": label,
                         "estimate": float(per[:, head].sum())})
            for pos in range(per.shape[0]):
                rows.append({"site": site, "layer": layer, "pos": pos, "head": head, "head_label": label,
                             "estimate": float(per[pos, head])})
    else:
        per = contrib.sum(-1) / span
        for pos, value in enumerate(per.tolist()):
            rows.append({"site": site, "layer": layer, "pos": pos, "head": None, "head_label": "", "estimate": value})
    return rows


def spearman(x, y) -> float:
    x, y = pd.Series(np.asarray(x, float)).rank(), pd.Series(np.asarray(y, float)).rank()
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def compare_with_exact(lm, tp: TokenizedPair, result: AttributionResult, site: str, progress=None) -> pd.DataFrame:
    """Exact denoising patches for the same cells, merged with the estimates."""
    from explorer.analyses.patching import head_sweep, patch_sweep
    if site == "head_out":
        exact = head_sweep(lm, tp, "all", "denoise", progress=progress).frame
        est = result.table("head_out", per_position=False)
        keys = ["layer", "head"]
    else:
        exact = patch_sweep(lm, tp, site, "each", "denoise", progress=progress).frame
        est = result.table(site)
        keys = ["layer", "pos"]
    merged = est.merge(exact[keys + ["recovery"]], on=keys)
    return merged.rename(columns={"recovery": "exact"})
