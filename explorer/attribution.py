"""Attribution patching: a first-order Taylor estimate of activation patching for every site.

estimate(site) = (a_clean - a_corr) · dLD/da, the gradient taken on the corrupted run,
divided by (LD_clean - LD_corr) so it reads like recovery. One forward and one
backward pass on the corrupted run give every layer, position and head at once. It is
a screen: the page always shows it beside exact patching (seed mistake 9).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from explorer.baseline import pair_lds
from explorer.cache import get_activations
from explorer.errors import ExplorerInputError
from explorer.prompts import TokenizedPair
from explorer.runtime import HOST, to_model

ATTRIBUTION_FORMULA = "estimate = (a_clean − a_corr) · ∂LD/∂a at the corrupted run, / (LD_clean − LD_corr)"
ATTR_SITES = ("resid_pre", "attn_out", "mlp_out", "head_out")


@dataclass(frozen=True)
class AttributionResult:
    frame: pd.DataFrame  # site, layer, pos, head, estimate  (head_out rows per position; pos=-1 sums positions)
    ld_clean: float
    ld_corrupted: float
    formula: str = ATTRIBUTION_FORMULA

    def table(self, site: str, per_position: bool = True) -> pd.DataFrame:
        f = self.frame[self.frame["site"] == site]
        if site == "head_out":
            return f[(f["pos"] >= 0) if per_position else (f["pos"] == -1)].reset_index(drop=True)
        return f.reset_index(drop=True)

    def ranked_heads(self, top: int = 20) -> pd.DataFrame:
        f = self.table("head_out", per_position=False)
        return f.reindex(f["estimate"].abs().sort_values(ascending=False).index).head(top).reset_index(drop=True)


def _site_tensor(lm, root, site: str, layer: int):
    if site == "resid_pre":
        return lm.sites.layer(root, layer).input
    if site == "head_out":
        return lm.sites.o_proj(root, layer).input
    if site == "attn_out":
        out = lm.sites.mixer(root, layer).output
        return out[0] if isinstance(out, tuple) else out
    return lm.sites.mlp(root, layer).output


def attribution_patching(lm, tp: TokenizedPair, sites=ATTR_SITES) -> AttributionResult:
    import nnsight

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
    a, b = tp.clean_answer_id, tp.corrupted_answer_id
    ids = to_model(lm, torch.tensor([list(tp.corrupted_ids)], device=HOST))
    with lm.lock, torch.enable_grad():
        with lm.nn.trace(ids):
            embed = lm.sites.embed(lm.nn).output
            embed.requires_grad_(True)  # weights are frozen; gradients flow from the embedding on
            acts = nnsight.save([])
            for site, layer in reads:
                acts.append(_site_tensor(lm, lm.nn, site, layer))
            logits = lm.nn.output.logits
            ld = logits[0, -1, a] - logits[0, -1, b]
            grads = nnsight.save([])
            with ld.backward():
                for act in reversed(acts):
                    grads.append(act.grad)
            acts = [x.detach() for x in acts]
            nnsight.save(acts)
    lm.forward_calls += 1
    grads = list(reversed(grads))
    rows = []
    for (site, layer), corr_act, grad in zip(reads, acts, grads):
        delta = to_model(lm, clean[(site, layer)], torch.float32) - corr_act[0].float().view(clean[(site, layer)].shape)
        g = grad[0].float().view(delta.shape)
        contrib = (delta * g)  # [pos, d] or [pos, head, d_head]
        if site == "head_out":
            per = contrib.sum(-1) / span  # [pos, head]
            for head in range(per.shape[1]):
                label = lm.arch.head_label(layer, head)
                rows.append({"site": site, "layer": layer, "pos": -1, "head": head, "head_label": label,
                             "estimate": float(per[:, head].sum())})
                for pos in range(per.shape[0]):
                    rows.append({"site": site, "layer": layer, "pos": pos, "head": head, "head_label": label,
                                 "estimate": float(per[pos, head])})
        else:
            per = contrib.sum(-1) / span
            for pos, value in enumerate(per.tolist()):
                rows.append({"site": site, "layer": layer, "pos": pos, "head": -1, "head_label": "", "estimate": value})
    frame = pd.DataFrame(rows)
    diff = set(tp.differing_positions)
    frame["differs"] = frame["pos"].isin(diff)
    return AttributionResult(frame, ld_clean, ld_corr)


def spearman(x, y) -> float:
    x, y = pd.Series(np.asarray(x, float)).rank(), pd.Series(np.asarray(y, float)).rank()
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def compare_with_exact(lm, tp: TokenizedPair, result: AttributionResult, site: str, progress=None) -> pd.DataFrame:
    """Exact denoising patches for the same cells, merged with the estimates."""
    from explorer.patching import head_sweep, patch_sweep
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
