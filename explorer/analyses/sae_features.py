"""SAE features on a prompt pair: which latents fire where, which carry the logit difference, and what happens
when one is patched, knocked down or steered with; plus the feature index (top held-out contexts) behind a card.

Every change goes through the SAE with its error term kept: the site's new value is
    decode(latents_new) + (activation - decode(latents_original)),
so with no latent changed the model runs exactly as it does without the SAE. Position 0 (BOS, or the attention sink
when a model has none) is never spliced: SAEs here are trained without it. Results are dataclasses with tidy
frames and `to_json()`; everything returned is on the CPU in float32.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from explorer.core import engine
from explorer.core.cache import get_activations
from explorer.core.errors import ExplorerInputError
from explorer.core.metrics import LD_FORMULA, RECOVERY_FORMULA, logit_diff
from explorer.core.prompts import TokenizedPair, show_token, tokenize_pair
from explorer.core.results import Result, jsonable, make_spec
from explorer.core.runtime import HOST, to_host
from explorer.sources.sae import SAE, check_fits, spliced_positions

SPLICE_FORMULA = ("site value = decode(latents_new) + (activation − decode(latents)) at the spliced positions "
                  "(error term kept; not position 0, no massive activations)")
ATTRIBUTION_FORMULA = ("estimate(pos, latent) = (z_clean − z_corr) · dLD/dz at the corrupted run, "
                       "dLD/dz = W_dec[latent] · dLD/d(site); normalised like recovery")
INDEX_TENSORS, INDEX_META = "feature_index.safetensors", "feature_index.json"


def _frame_json(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def _site(sae: SAE) -> tuple[str, int]:
    return sae.cfg.site


def _prompt_acts(lm, sae: SAE, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-position logits [vocab], site activation [pos, d_in]) of one prompt, cached."""
    site, layer = _site(sae)
    logits, acts = get_activations(lm, ids, [(site, layer)])
    return logits, acts[(site, layer)]


def _latents(sae: SAE, act: torch.Tensor) -> torch.Tensor:
    """[pos, d_sae] on the CPU; all zeros at positions that are not spliced (position 0, outliers)."""
    z = to_host(sae.encode(act))
    z[~spliced_positions(act)] = 0.0
    return z


def splice(sae: SAE, act: torch.Tensor, latents_new: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The site value that carries latents_new: decode(new) + error term at the spliced positions (not position 0,
    no outliers), the activation itself elsewhere. [..., pos, d_in]."""
    error = act - to_host(sae.decode(latents))
    out = to_host(sae.decode(latents_new)) + error
    keep = spliced_positions(act)
    out[~keep] = act[~keep]
    return out


def _run_values(lm, sae: SAE, ids: tuple[int, ...], values: torch.Tensor, answers=None) -> torch.Tensor:
    """Logits at the last position [n, vocab] (or [n, len(answers)]) with values [n, pos, d_in] written at the
    SAE's site, one row per value."""
    site, layer = _site(sae)
    n = len(values)
    batch = torch.tensor([list(ids)] * n, dtype=torch.long, device=HOST)
    iv = engine.Intervention(site, layer, torch.arange(n, device=HOST), None, values)
    opts = engine.PassOptions(answers=tuple(answers)) if answers is not None else engine.DEFAULT
    return engine.run(lm, batch, [iv], options=opts).logits


def _tokens(lm, ids) -> list[str]:
    return [show_token(lm.tokenizer, i) for i in ids]


def _as_tokenized(lm, pair) -> TokenizedPair:
    return pair if isinstance(pair, TokenizedPair) else tokenize_pair(lm.tokenizer, pair, lm.arch)


class _SAEResult(Result):
    """A result with the spec that produced it (analysis, model, pair, the SAE and the parameters) first in its
    JSON and Result.meta() for exports; the body is each class's own _json()."""

    def to_json(self) -> dict:
        return {"spec": jsonable(self.spec), **self._json()}


def _spec(analysis: str, lm, sae: SAE, tp=None, **params) -> dict:
    return make_spec(analysis, lm, tp, sae=sae.describe(), **params)


# ---------------- per-token latents on a pair ----------------
@dataclass(frozen=True)
class PairLatents(_SAEResult):
    """Latent activations of both runs. clean/corrupted: [pos, d_sae] tensors; top: the strongest latents per
    position and run (run, pos, token, rank, latent, activation)."""

    sae: dict
    clean: torch.Tensor = field(repr=False)
    corrupted: torch.Tensor = field(repr=False)
    clean_tokens: tuple[str, ...]
    corrupted_tokens: tuple[str, ...]
    top: pd.DataFrame
    warnings: tuple[str, ...] = ()
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    def heatmap(self, latents: list[int], run: str = "clean") -> pd.DataFrame:
        """Token x latent cells (pos, token, latent, activation) for chosen latents of one run."""
        z, tokens = (self.clean, self.clean_tokens) if run == "clean" else (self.corrupted, self.corrupted_tokens)
        rows = [{"run": run, "pos": p, "token": tokens[p], "latent": int(i), "activation": float(z[p, i])}
                for p in range(len(tokens)) for i in latents]
        return pd.DataFrame(rows)

    def differing(self, pos: int, top: int = 10) -> pd.DataFrame:
        """The latents whose activation differs most between the runs at `pos` (needs equal lengths)."""
        n = min(len(self.clean), len(self.corrupted))
        if not 0 <= pos < n:
            raise ExplorerInputError(f"Position {pos} is out of range: the prompts share positions 0..{n - 1}.")
        diff = self.clean[pos] - self.corrupted[pos]
        order = diff.abs().argsort(descending=True)[:top]
        return pd.DataFrame([{"pos": pos, "latent": int(i), "clean": float(self.clean[pos, i]),
                              "corrupted": float(self.corrupted[pos, i]), "difference": float(diff[i])}
                             for i in order if diff[i] != 0])

    def _json(self) -> dict:
        return jsonable({"sae": self.sae, "top": _frame_json(self.top), "warnings": list(self.warnings)})


def pair_latents(lm, sae: SAE, pair, top_n: int = 5) -> PairLatents:
    warnings = tuple(check_fits(sae, lm))
    tp = _as_tokenized(lm, pair)
    zs = {}
    for run, ids in (("clean", tp.clean_ids), ("corrupted", tp.corrupted_ids)):
        zs[run] = _latents(sae, _prompt_acts(lm, sae, ids)[1])
    rows = []
    for run, tokens in (("clean", tp.clean_tokens), ("corrupted", tp.corrupted_tokens)):
        values, index = zs[run].topk(min(top_n, sae.d_sae), dim=-1)
        for p in range(1, len(tokens)):
            for r in range(values.shape[1]):
                if values[p, r] > 0:
                    rows.append({"run": run, "pos": p, "token": tokens[p], "rank": r, "latent": int(index[p, r]),
                                 "activation": float(values[p, r])})
    top = pd.DataFrame(rows, columns=["run", "pos", "token", "rank", "latent", "activation"])
    return PairLatents(sae.describe(), zs["clean"], zs["corrupted"], tp.clean_tokens, tp.corrupted_tokens, top,
                       warnings, spec=_spec("SAE latents", lm, sae, tp, top_n=top_n))


# ---------------- latent attribution ----------------
@dataclass(frozen=True)
class LatentAttribution(_SAEResult):
    """cells: one row per (pos, latent) active in either run: z_clean, z_corr, grad (dLD/dz), estimate (normalised
    like recovery). exact: the top cells patched for real (clean latent value into the corrupted run).
    per_latent: estimates summed over positions."""

    sae: dict
    ld_clean: float
    ld_corrupted: float
    cells: pd.DataFrame
    per_latent: pd.DataFrame
    exact: pd.DataFrame
    formula: str = ATTRIBUTION_FORMULA
    recovery_formula: str = RECOVERY_FORMULA
    splice_formula: str = SPLICE_FORMULA
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    def _json(self) -> dict:
        return jsonable({"sae": self.sae, "ld_clean": self.ld_clean, "ld_corrupted": self.ld_corrupted,
                "formula": self.formula, "recovery_formula": self.recovery_formula,
                "splice_formula": self.splice_formula,
                "cells": _frame_json(self.cells), "per_latent": _frame_json(self.per_latent),
                "exact": _frame_json(self.exact)})


def latent_attribution(lm, sae: SAE, pair, exact_top: int = 10) -> LatentAttribution:
    """First-order attribution of LD to every latent at every position (one forward and one backward pass on the
    corrupted run), beside exact latent patching of the `exact_top` cells with the largest |estimate|."""
    check_fits(sae, lm)
    tp = _as_tokenized(lm, pair)
    tp.require_same_length("Latent attribution")
    site, layer = _site(sae)
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    logits_clean, act_clean = _prompt_acts(lm, sae, tp.clean_ids)
    logits_corr, act_corr = _prompt_acts(lm, sae, tp.corrupted_ids)
    ld_clean = float(logit_diff(logits_clean[None], *answers)[0])
    ld_corr = float(logit_diff(logits_corr[None], *answers)[0])
    span = ld_clean - ld_corr
    if abs(span) < 1e-6:
        raise ExplorerInputError("LD_clean equals LD_corrupted, so recovery is undefined: pick prompts whose "
                                 "answers differ between the runs.")
    z_clean, z_corr = _latents(sae, act_clean), _latents(sae, act_corr)
    grads = engine.gradients(lm, tp.corrupted_tensor(), [(site, layer)], answers)
    grad_site = to_host(grads[(site, layer)][1][0])  # [pos, d_in]
    grad_z = to_host(sae.place(grad_site) @ sae.decoder_rows().T)  # [pos, d_sae]
    estimate = (z_clean - z_corr) * grad_z / span
    pos_idx, lat_idx = torch.nonzero((z_clean != 0) | (z_corr != 0), as_tuple=True)
    cells = pd.DataFrame({
        "pos": pos_idx.numpy(), "token": [tp.clean_tokens[p] for p in pos_idx.tolist()],
        "latent": lat_idx.numpy(), "z_clean": z_clean[pos_idx, lat_idx].numpy(),
        "z_corr": z_corr[pos_idx, lat_idx].numpy(), "grad": grad_z[pos_idx, lat_idx].numpy(),
        "estimate": estimate[pos_idx, lat_idx].numpy()})
    cells = cells.sort_values("estimate", key=np.abs, ascending=False, ignore_index=True)
    per_latent = (cells.groupby("latent", as_index=False)["estimate"].sum()
                  .sort_values("estimate", key=np.abs, ascending=False, ignore_index=True))
    top = cells.head(exact_top)
    exact = top.copy()
    if len(top):
        values = []
        for p, i in zip(top["pos"], top["latent"]):
            z_new = z_corr.clone()
            z_new[p, i] = z_clean[p, i]
            values.append(splice(sae, act_corr, z_new, z_corr))
        logits = _run_values(lm, sae, tp.corrupted_ids, torch.stack(values), answers)
        lds = logit_diff(logits, 0, 1).numpy()  # the two answers' logits only
        exact["ld_patched"] = lds
        exact["exact"] = (lds - ld_corr) / span
    return LatentAttribution(sae.describe(), ld_clean, ld_corr, cells, per_latent, exact,
                             spec=_spec("SAE latent attribution", lm, sae, tp, exact_top=exact_top, direction="denoise"))


def patch_latents(lm, sae: SAE, pair, latent_sets: list[list[int]], positions="all") -> pd.DataFrame:
    """Exact denoising patch of whole latents: each set's clean values go into the corrupted run at every position
    >= 1 (or the given positions), the error term kept; one row per set (latents, ld_patched, recovery), one pass."""
    check_fits(sae, lm)
    tp = _as_tokenized(lm, pair)
    tp.require_same_length("Latent patching")
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    logits_clean, act_clean = _prompt_acts(lm, sae, tp.clean_ids)
    logits_corr, act_corr = _prompt_acts(lm, sae, tp.corrupted_ids)
    ld_clean = float(logit_diff(logits_clean[None], *answers)[0])
    ld_corr = float(logit_diff(logits_corr[None], *answers)[0])
    z_clean, z_corr = _latents(sae, act_clean), _latents(sae, act_corr)
    where = list(range(1, tp.n_pos)) if positions == "all" else [int(p) for p in positions]
    values = []
    for latents in latent_sets:
        latents = [sae.check_latent(int(i)) for i in latents]
        z_new = z_corr.clone()
        for p in where:
            z_new[p, latents] = z_clean[p, latents]
        values.append(splice(sae, act_corr, z_new, z_corr))
    logits = _run_values(lm, sae, tp.corrupted_ids, torch.stack(values), answers)
    lds = logit_diff(logits, 0, 1).numpy()  # the two answers' logits only
    span = ld_clean - ld_corr
    return pd.DataFrame({"latents": [",".join(map(str, s)) for s in latent_sets], "ld_patched": lds,
                         "recovery": (lds - ld_corr) / span if span else np.nan})


# ---------------- feature index ----------------
@dataclass
class FeatureIndex:
    """Every latent's held-out record: sparse activations of all index tokens (CSR over tokens), top contexts,
    firing counts and a histogram of log10 activations. tokens [N] are the windows laid end to end."""

    tokens: torch.Tensor  # [N] int32
    window_starts: torch.Tensor  # [W + 1] int64
    offsets: torch.Tensor  # [N + 1] int64, CSR over tokens
    latent_ids: torch.Tensor  # [nnz] int32
    values: torch.Tensor  # [nnz] float16
    top_tokens: torch.Tensor  # [d_sae, n_top] int64 (-1 = none)
    top_values: torch.Tensor  # [d_sae, n_top] float32
    counts: torch.Tensor  # [d_sae] int64
    hist: torch.Tensor  # [d_sae, bins] int64
    hist_edges: torch.Tensor  # [bins + 1] log10 activation
    act_mean: torch.Tensor  # [d_in] mean activation over the counted tokens
    meta: dict

    @property
    def n_counted(self) -> int:
        return int(self.meta["n_counted"])

    @property
    def fvu(self) -> float:
        return float(self.meta["fvu"])

    @property
    def l0(self) -> float:
        return float(self.meta["l0"])

    @property
    def frequency(self) -> torch.Tensor:
        return self.counts.float() / max(self.n_counted, 1)

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        small = self.latent_ids.to(torch.int16) if self.meta["d_sae"] < 32768 else self.latent_ids
        tensors = {"tokens": self.tokens, "window_starts": self.window_starts, "offsets": self.offsets.to(torch.int32),
                   "latent_ids": small, "values": self.values, "top_tokens": self.top_tokens.to(torch.int32),
                   "top_values": self.top_values.half(), "counts": self.counts.to(torch.int32),
                   "hist": self.hist.to(torch.int32), "hist_edges": self.hist_edges, "act_mean": self.act_mean}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(folder) / INDEX_TENSORS))
        (Path(folder) / INDEX_META).write_text(json.dumps(self.meta, indent=1))


def load_feature_index(folder) -> FeatureIndex | None:
    """The index stored beside an SAE, or None when there is none."""
    from safetensors.torch import load_file

    path = Path(folder)
    if not (path / INDEX_TENSORS).is_file() or not (path / INDEX_META).is_file():
        return None
    try:
        t = {k: to_host(v) for k, v in load_file(str(path / INDEX_TENSORS)).items()}
        meta = json.loads((path / INDEX_META).read_text())
    except Exception as exc:  # a damaged index is a user-fixable file problem, not a crash
        raise ExplorerInputError(f"The feature index in {folder} is unreadable ({str(exc)[:120]}); rebuild it with "
                                 "`python -m explorer sae index`.") from None
    return FeatureIndex(t["tokens"], t["window_starts"], t["offsets"].long(), t["latent_ids"].int(), t["values"],
                        t["top_tokens"].long(), t["top_values"].float(), t["counts"].long(), t["hist"].long(),
                        t["hist_edges"], t["act_mean"], meta)


@torch.no_grad()
def build_feature_index(lm, sae: SAE, corpus, n_tokens: int, context: int = 128, batch: int = 8, n_top: int = 20,
                        bins: int = 24, progress: bool = False) -> FeatureIndex:
    """Encode `n_tokens` held-out tokens (windows in corpus order, at the spliced positions: not position 0, no
    outliers) and keep what a feature card needs. Also measures FVU = Σ‖x − x̂‖² / Σ‖x − mean‖² and L0 over the
    same tokens."""
    from tqdm import tqdm

    site, layer = _site(sae)
    d_sae = sae.d_sae
    edges = torch.linspace(-3, 3, bins + 1, device=HOST)  # log10 activation from 0.001 to 1000
    top_v = torch.full((d_sae, n_top), -1.0, device=HOST)
    top_t = torch.full((d_sae, n_top), -1, dtype=torch.long, device=HOST)
    counts = torch.zeros(d_sae, dtype=torch.long, device=HOST)
    hist = torch.zeros(d_sae, bins, dtype=torch.long, device=HOST)
    tokens, starts, offsets, lat_ids, values = [], [0], [0], [], []
    err2 = sum_x2 = 0.0
    sum_vec = None
    counted = active = outliers = 0
    bar = tqdm(total=n_tokens, unit="tok", desc="feature index", file=sys.stderr, disable=not progress)
    for ids in corpus.batches(context, batch, shuffle=False):
        from explorer.analyses.sae_train import site_activations

        act = site_activations(lm, ids, site, layer)  # [b, pos, d]
        for row in range(len(ids)):
            x = act[row, 1:]
            kept = spliced_positions(act[row])[1:]
            outliers += int((~kept).sum())
            z = to_host(sae.encode(x))
            z[~kept] = 0.0
            recon = to_host(sae.decode(z))
            xk = x[kept].double()
            err2 += float((xk - recon[kept].double()).pow(2).sum())
            sum_x2 += float(xk.pow(2).sum())
            sum_vec = xk.sum(0) if sum_vec is None else sum_vec + xk.sum(0)
            base = sum(len(t) for t in tokens)
            tokens.append(ids[row].to(torch.int32))
            starts.append(base + len(ids[row]))
            nz_pos, nz_lat = torch.nonzero(z, as_tuple=True)
            per_token = torch.bincount(nz_pos, minlength=len(x))
            offsets.append(offsets[-1])  # position 0: no entries
            for c in per_token.tolist():
                offsets.append(offsets[-1] + c)
            lat_ids.append(nz_lat.to(torch.int32))
            vals = z[nz_pos, nz_lat]
            values.append(vals.half())
            counts += torch.bincount(nz_lat, minlength=d_sae)
            b = torch.bucketize(vals.log10().clamp(-3, 2.999), edges) - 1
            hist.view(-1).index_add_(0, nz_lat * bins + b.clamp(0, bins - 1), torch.ones_like(b))
            # running top contexts per latent: merge this window's best token per latent
            best_v, best_p = z.max(0)
            cand_v = torch.cat([top_v, best_v[:, None]], 1)
            cand_t = torch.cat([top_t, (base + 1 + best_p)[:, None]], 1)
            order = cand_v.argsort(dim=1, descending=True)[:, :n_top]
            top_v, top_t = cand_v.gather(1, order), cand_t.gather(1, order)
            counted += int(kept.sum())
            active += len(nz_pos)
        bar.update(act.shape[0] * (act.shape[1] - 1))
        if counted >= n_tokens:
            break
    bar.close()
    if counted == 0:
        raise ExplorerInputError("The held-out corpus gave no tokens for the feature index.")
    mean = (sum_vec / counted)
    var = sum_x2 - counted * float(mean.pow(2).sum())
    top_t[top_v <= 0] = -1
    meta = {"sae": {**sae.describe(), "folder": None}, "model": lm.model_id, "corpus": corpus.name,
            "split": corpus.split,
            "context": context, "n_counted": counted, "n_tokens": int(sum(len(t) for t in tokens)),
            "fvu": err2 / var if var > 0 else float("nan"), "l0": active / counted, "d_sae": d_sae,
            "outliers": outliers,
            "note": "top contexts keep at most one token per window and latent"}
    return FeatureIndex(torch.cat(tokens), torch.tensor(starts, dtype=torch.long, device=HOST),
                        torch.tensor(offsets, device=HOST),
                        torch.cat(lat_ids), torch.cat(values), top_t, top_v.clamp_min(0), counts, hist, edges,
                        mean.float(), meta)


def latent_values_at(index: FeatureIndex, latent: int, token_positions: torch.Tensor) -> torch.Tensor:
    """Activation of one latent at the given index tokens (0 where it does not fire)."""
    out = torch.zeros(len(token_positions), device=HOST)
    for j, t in enumerate(token_positions.tolist()):
        a, b = int(index.offsets[t]), int(index.offsets[t + 1])
        hit = (index.latent_ids[a:b] == latent).nonzero()
        if len(hit):
            out[j] = float(index.values[a + int(hit[0, 0])])
    return out


# ---------------- logit effects ----------------
def logit_effects(lm, sae: SAE, latent: int, top: int = 10) -> pd.DataFrame:
    """The decoder direction through the final norm's gain (and centring, for LayerNorm) and the unembedding:
    the tokens it promotes and suppresses most (direction, rank, token, logit). The norm's scale is left out: it
    depends on the residual the direction is added to, and it only rescales every logit alike."""
    sae.check_latent(latent)
    fam = lm.arch.family
    direction = to_host(sae.decoder_rows()[latent])
    if fam.norm_kind == "layernorm":
        direction = direction - direction.mean()
    gain = getattr(lm.sites.final_norm(lm.torch_model), "weight", None)
    if gain is not None:
        direction = direction * (to_host(gain) + fam.norm_weight_offset)
    W_U = to_host(lm.sites.unembed(lm.torch_model).weight)  # [vocab, d_model]; no copy for a CPU float32 model
    logits = W_U @ direction
    rows = []
    for name, (values, index) in (("promoted", logits.topk(top)), ("suppressed", (-logits).topk(top))):
        for rank, tok in enumerate(index.tolist()):
            rows.append({"direction": name, "rank": rank, "token_id": tok, "token": show_token(lm.tokenizer, tok),
                         "logit": float(logits[tok])})
    return pd.DataFrame(rows)


# ---------------- feature card ----------------
@dataclass(frozen=True)
class FeatureCard(_SAEResult):
    """One latent: top held-out contexts (context, offset, token, activation, is_top), frequency, histogram
    (bin_lo, bin_hi, count on log10 activation), logit effects, and where it fires on a prompt set."""

    sae: dict
    latent: int
    frequency: float | None
    contexts: pd.DataFrame
    histogram: pd.DataFrame
    logit_effects: pd.DataFrame
    pairs: pd.DataFrame
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    def _json(self) -> dict:
        return jsonable({"sae": self.sae, "latent": self.latent, "frequency": self.frequency,
                "contexts": _frame_json(self.contexts), "histogram": _frame_json(self.histogram),
                "logit_effects": _frame_json(self.logit_effects), "pairs": _frame_json(self.pairs)})


def feature_card(lm, sae: SAE, latent: int, index: FeatureIndex | None = None, n_contexts: int = 10,
                 before: int = 8, after: int = 4, pairs: list | None = None) -> FeatureCard:
    sae.check_latent(latent)
    index = index if index is not None else (load_feature_index(sae.folder) if sae.folder else None)
    ctx_rows, hist_rows, freq = [], [], None
    if index is not None:
        freq = float(index.frequency[latent])
        edges = index.hist_edges
        for b in range(len(edges) - 1):
            hist_rows.append({"bin_lo": float(10 ** edges[b]), "bin_hi": float(10 ** edges[b + 1]),
                              "count": int(index.hist[latent, b])})
        starts = index.window_starts
        for rank, t in enumerate(index.top_tokens[latent, :n_contexts].tolist()):
            if t < 0:
                break
            w = int(torch.searchsorted(starts, torch.tensor(t, device=HOST), right=True)) - 1
            a, b = max(int(starts[w]) + 1, t - before), min(int(starts[w + 1]), t + after + 1)
            span = torch.arange(a, b, device=HOST)
            acts = latent_values_at(index, latent, span)
            for pos, tok, act in zip(span.tolist(), index.tokens[a:b].tolist(), acts.tolist()):
                ctx_rows.append({"context": rank, "offset": pos - t, "token": show_token(lm.tokenizer, tok),
                                 "activation": act, "is_top": pos == t})
    elif sae.sparsity is not None:
        freq = float(10 ** sae.sparsity[latent])
    pair_frame = pairs_where_fires(lm, sae, pairs, [latent]) if pairs else pd.DataFrame()
    return FeatureCard(sae.describe(), latent, freq,
                       pd.DataFrame(ctx_rows, columns=["context", "offset", "token", "activation", "is_top"]),
                       pd.DataFrame(hist_rows, columns=["bin_lo", "bin_hi", "count"]),
                       logit_effects(lm, sae, latent), pair_frame,
                       spec=_spec("SAE feature card", lm, sae, latent=latent, n_contexts=n_contexts,
                                  prompt_set=[getattr(getattr(p, 'pair', p), 'id', str(i)) for i, p in enumerate(pairs or [])]))


def pairs_where_fires(lm, sae: SAE, pairs: list, latents: list[int]) -> pd.DataFrame:
    """For each pair: the largest activation of any of `latents` on each run, and where (pair_id, run, max_act,
    pos, token). Only pairs where it fires."""
    rows = []
    for pair in pairs:
        tp = _as_tokenized(lm, pair)
        for run, ids, tokens in (("clean", tp.clean_ids, tp.clean_tokens),
                                 ("corrupted", tp.corrupted_ids, tp.corrupted_tokens)):
            z = _latents(sae, _prompt_acts(lm, sae, ids)[1])[:, latents].max(-1).values
            if z.max() > 0:
                p = int(z.argmax())
                rows.append({"pair_id": tp.pair.id, "run": run, "max_activation": float(z[p]), "pos": p,
                             "token": tokens[p]})
    return pd.DataFrame(rows, columns=["pair_id", "run", "max_activation", "pos", "token"])


# ---------------- knockdown ----------------
def _bootstrap(values: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass(frozen=True)
class KnockdownResult(_SAEResult):
    """per_pair: pair_id, active (a target latent fires on the clean prompt), ld_clean, ld_ablated, drop.
    random: one row per random latent set (set, latents, mean_drop). summary: the headline numbers."""

    sae: dict
    latents: tuple[int, ...]
    method: str
    per_pair: pd.DataFrame
    random: pd.DataFrame
    summary: dict
    formula: str = "drop = LD_clean − LD_clean with the latents ablated (error term kept)"
    splice_formula: str = SPLICE_FORMULA
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    def _json(self) -> dict:
        return jsonable({"sae": self.sae, "latents": list(self.latents), "method": self.method,
                "formula": self.formula, "splice_formula": self.splice_formula,
                "summary": self.summary, "per_pair": _frame_json(self.per_pair), "random": _frame_json(self.random)})


def _similar_frequency(freq: torch.Tensor, targets: list[int], rng: np.random.Generator, pool: int = 50) -> list[int]:
    """For each target, a random latent among the `pool` whose log frequency is nearest its own."""
    logf = torch.log10(freq.double() + 1e-10)
    chosen = []
    for t in targets:
        order = (logf - logf[t]).abs().argsort().tolist()
        candidates = [i for i in order if i not in targets and i not in chosen][:pool]
        chosen.append(int(rng.choice(candidates)))
    return chosen


def knockdown(lm, sae: SAE, pairs: list, latents: list[int], method: str = "zero", n_random: int = 20,
              seed: int = 0, n_boot: int = 1000, reference: list | None = None) -> KnockdownResult:
    """Zero- or mean-ablate `latents` at every position >= 1 of each pair's clean prompt, the error term kept, and
    compare the drop in LD with `n_random` sets of latents of similar firing frequency (one pass per pair)."""
    if method not in ("zero", "mean"):
        raise ExplorerInputError(f"Knockdown method must be zero or mean, not {method!r}.")
    check_fits(sae, lm)
    latents = [sae.check_latent(i) for i in latents]
    if not latents:
        raise ExplorerInputError("Name at least one latent to knock down.")
    if not pairs:
        raise ExplorerInputError("Knockdown needs at least one prompt pair.")
    tps = [_as_tokenized(lm, p) for p in pairs]
    cached = [_prompt_acts(lm, sae, tp.clean_ids) for tp in tps]
    zs = [_latents(sae, act) for _, act in cached]
    mean_z = None
    if method == "mean":
        ref_z = zs if reference is None else [_latents(sae, _prompt_acts(lm, sae, _as_tokenized(lm, p).clean_ids)[1])
                                              for p in reference]
        mean_z = torch.cat([z[1:] for z in ref_z]).mean(0)
    if sae.sparsity is not None:
        freq = 10 ** sae.sparsity.double()
    else:
        all_z = torch.cat([z[1:] for z in zs])
        freq = (all_z > 0).double().mean(0)
    rng = np.random.default_rng(seed)
    sets = [latents] + [_similar_frequency(freq, latents, rng) for _ in range(n_random)]
    rows, drops = [], np.zeros((len(tps), len(sets)))
    for j, (tp, (logits, act), z) in enumerate(zip(tps, cached, zs)):
        answers = (tp.clean_answer_id, tp.corrupted_answer_id)
        ld = float(logit_diff(logits[None], *answers)[0])
        values = []
        for s in sets:
            z_new = z.clone()
            z_new[1:, s] = 0.0 if mean_z is None else mean_z[s]
            values.append(splice(sae, act, z_new, z))
        out = _run_values(lm, sae, tp.clean_ids, torch.stack(values), answers)
        ld_abl = logit_diff(out, 0, 1).numpy()  # the two answers' logits only
        drops[j] = ld - ld_abl
        rows.append({"pair_id": tp.pair.id, "active": bool((z[1:, latents] > 0).any()), "ld_clean": ld,
                     "ld_ablated": float(ld_abl[0]), "drop": float(drops[j, 0])})
    per_pair = pd.DataFrame(rows)
    random_means = drops[:, 1:].mean(0) if n_random else np.array([])
    random = pd.DataFrame({"set": range(n_random), "latents": [",".join(map(str, s)) for s in sets[1:]],
                           "mean_drop": random_means})
    active = per_pair["active"].to_numpy()
    target = drops[:, 0]
    summary = {
        "pairs": len(tps), "pairs_active": int(active.sum()),
        "mean_drop": float(target.mean()), "mean_drop_ci95": _bootstrap(target, n_boot, seed),
        "mean_drop_active": float(target[active].mean()) if active.any() else None,
        "mean_drop_active_ci95": _bootstrap(target[active], n_boot, seed) if active.any() else None,
        "random_sets": n_random,
        "random_mean_drop": float(random_means.mean()) if n_random else None,
        "random_mean_drop_range95": ((float(np.percentile(random_means, 2.5)), float(np.percentile(random_means, 97.5)))
                                     if n_random else None),
        "fraction_of_random_below": float((random_means < target.mean()).mean()) if n_random else None,
        "random_chosen_by": "latents of similar firing frequency (" +
                            ("held-out sparsity" if sae.sparsity is not None else "this prompt set") + ")",
    }
    return KnockdownResult(sae.describe(), tuple(latents), method, per_pair, random, summary,
                           spec=_spec("SAE knockdown", lm, sae, prompt_set=[tp.pair.id for tp in tps], latents=latents,
                                      method=method, n_random=n_random, seed=seed))


# ---------------- steering ----------------
@dataclass(frozen=True)
class SteeringResult(_SAEResult):
    """LD and top next tokens with and without alpha · decoder direction added at the site, and greedy
    continuations of both. top: (steered, rank, token, prob)."""

    sae: dict
    latent: int
    alpha: float
    positions: str
    ld: float
    ld_steered: float
    top: pd.DataFrame
    continuation: str
    continuation_steered: str
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    @property
    def ld_change(self) -> float:
        return self.ld_steered - self.ld

    def _json(self) -> dict:
        return jsonable({"sae": self.sae, "latent": self.latent, "alpha": self.alpha, "positions": self.positions,
                "ld": self.ld, "ld_steered": self.ld_steered, "ld_change": self.ld_change, "top": _frame_json(self.top),
                "continuation": self.continuation, "continuation_steered": self.continuation_steered})


def _steered_logits(lm, sae: SAE, ids: list[int], direction: torch.Tensor, positions) -> torch.Tensor:
    site, layer = _site(sae)
    _, acts = get_activations(lm, ids, [(site, layer)], use_disk=False)
    value = acts[(site, layer)].clone()
    where = range(1, len(ids)) if positions == "all" else [p for p in positions if p < len(ids)]
    for p in where:
        value[p] += direction
    return _run_values(lm, sae, tuple(ids), value[None])[0]


def steer(lm, sae: SAE, pair, latent: int, alpha: float, positions="all", run: str = "clean", n_new: int = 8,
          top_k: int = 10) -> SteeringResult:
    """Add alpha * W_dec[latent] to the site at positions >= 1 ('all', which also steers the generated tokens) or
    at chosen positions, on the clean (or corrupted) prompt."""
    check_fits(sae, lm)
    sae.check_latent(latent)
    if not math.isfinite(alpha):
        raise ExplorerInputError("alpha must be a finite number.")
    tp = _as_tokenized(lm, pair)
    ids = list(tp.clean_ids if run == "clean" else tp.corrupted_ids)
    if positions != "all":
        positions = [int(p) for p in positions]
        bad = [p for p in positions if not 0 <= p < len(ids)]
        if bad:
            raise ExplorerInputError(f"Positions {bad} are out of range: the prompt has positions 0..{len(ids) - 1}.")
    direction = to_host(sae.decoder_rows()[latent]) * float(alpha)
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    base = _prompt_acts(lm, sae, ids)[0]
    steered = _steered_logits(lm, sae, ids, direction, positions)
    rows = []
    for name, lg in (("without", base), ("with", steered)):
        probs = torch.softmax(lg.double(), -1)
        p, idx = probs.topk(top_k)
        rows += [{"steered": name == "with", "rank": r, "token": show_token(lm.tokenizer, int(i)), "prob": float(q)}
                 for r, (q, i) in enumerate(zip(p.tolist(), idx.tolist()))]
    texts = []
    for steer_on in (False, True):
        seq = list(ids)
        for _ in range(n_new):
            lg = (_steered_logits(lm, sae, seq, direction, positions) if steer_on
                  else get_activations(lm, seq, [_site(sae)], use_disk=False)[0])
            seq.append(int(lg.argmax()))
        texts.append(lm.tokenizer.decode(seq[len(ids):]))
    return SteeringResult(sae.describe(), latent, float(alpha), "all" if positions == "all" else
                          ",".join(map(str, positions)), float(logit_diff(base[None], *answers)[0]),
                          float(logit_diff(steered[None], *answers)[0]), pd.DataFrame(rows), texts[0], texts[1],
                          spec=_spec("SAE steering", lm, sae, tp, latent=latent, alpha=float(alpha), positions=positions,
                                     run=run, n_new=n_new))


# ---------------- reconstruction health ----------------
@dataclass(frozen=True)
class HealthResult(_SAEResult):
    """per_position (the spliced positions: not position 0, no outliers): run, pos, token, fvu (‖x − x̂‖² /
    ‖x − held-out mean‖²), relative_error (‖x − x̂‖² / ‖x‖²), ld_spliced_here (LD with the reconstruction at this
    position only). ld / ld_reconstructed: LD of each run plain and with the reconstruction at every spliced
    position."""

    sae: dict
    per_position: pd.DataFrame
    ld: dict
    ld_reconstructed: dict
    fvu: dict
    mean_from: str
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    def _json(self) -> dict:
        return jsonable({"sae": self.sae, "per_position": _frame_json(self.per_position), "ld": self.ld,
                "ld_reconstructed": self.ld_reconstructed, "fvu": self.fvu, "mean_from": self.mean_from,
                "formula": LD_FORMULA})


def reconstruction_health(lm, sae: SAE, pair, index: FeatureIndex | None = None) -> HealthResult:
    check_fits(sae, lm)
    tp = _as_tokenized(lm, pair)
    index = index if index is not None else (load_feature_index(sae.folder) if sae.folder else None)
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    rows, ld, ld_rec, fvu = [], {}, {}, {}
    mean_from = "the held-out feature index" if index is not None else "this prompt's positions >= 1"
    for run, ids, tokens in (("clean", tp.clean_ids, tp.clean_tokens),
                             ("corrupted", tp.corrupted_ids, tp.corrupted_tokens)):
        logits, act = _prompt_acts(lm, sae, ids)
        z = _latents(sae, act)
        recon = to_host(sae.decode(z))
        mean = index.act_mean if index is not None else act[spliced_positions(act)].mean(0)
        err = (act - recon).pow(2).sum(-1)
        var = (act - mean).pow(2).sum(-1)
        kept = spliced_positions(act).nonzero().flatten().tolist()
        values = []
        for p in kept:  # one row per spliced position, plus one with all of them
            v = act.clone()
            v[p] = recon[p]
            values.append(v)
        every = act.clone()
        every[kept] = recon[kept]
        values.append(every)
        out = _run_values(lm, sae, ids, torch.stack(values), answers)
        lds = logit_diff(out, 0, 1).tolist()  # the two answers' logits only
        ld[run] = float(logit_diff(logits[None], *answers)[0])
        ld_rec[run] = lds[-1]
        fvu[run] = float(err[kept].sum() / var[kept].sum()) if kept else float("nan")
        for j, p in enumerate(kept):
            rows.append({"run": run, "pos": p, "token": tokens[p], "fvu": float(err[p] / var[p]),
                         "relative_error": float(err[p] / act[p].pow(2).sum()), "ld_spliced_here": lds[j]})
    return HealthResult(sae.describe(), pd.DataFrame(rows), ld, ld_rec, fvu, mean_from,
                        spec=_spec("SAE reconstruction health", lm, sae, tp))
