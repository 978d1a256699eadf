"""Activation patching: one generic engine, thin named variants.

A sweep is a list of patches; each patch is a tuple of cells (site, layer, position,
head) copied together from the source run into the target run. Denoise copies clean
activations into the corrupted run (metric: recovery); noise copies corrupted into
clean (metric: damage). Sweeps of single cells go through explorer.core.scheduler; patch
sets (several cells per row) take the plain batched path here, one batch row each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from explorer.core import budget, engine, scheduler
from explorer.core.adapters import HEAD_LABEL, LINEAR, canonical_site
from explorer.analyses.baseline import pair_lds
from explorer.core.cache import get_activations, load_result, result_key, save_result
from explorer.core.errors import ExplorerInputError
from explorer.core.metrics import logit_diff, metric_formula, metric_name, patch_effect
from explorer.core.prompts import TokenizedPair
from explorer.core.runtime import HOST
from explorer.core import positions as positions_
from explorer.core.positions import LAST
from explorer.core.results import Result, make_spec, nullable_ints
from explorer.core.scheduler import Cell, Patch  # noqa: F401  (the patch vocabulary, re-exported)

DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class PatchResult(Result):
    """One row per patch: layer/pos/head/token columns plus ld_patched and the metric."""

    frame: pd.DataFrame
    site: str
    positions: str  # "each", "last" or "all"
    direction: str
    ld_clean: float
    ld_corrupted: float
    pair: TokenizedPair
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)
    metric: str = field(init=False)
    formula: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "metric", metric_name(self.direction))
        object.__setattr__(self, "formula", metric_formula(self.direction))

    @property
    def title(self) -> str:
        """Every chart says site, positions, direction and metric (seed mistake 2)."""
        where = positions_.describe(self.positions)
        arrow = "clean → corrupted run (denoise)" if self.direction == "denoise" else "corrupted → clean run (noise)"
        return f"{self.site} patched at {where}, {arrow}: {self.metric}"

    def to_records(self) -> list[dict]:
        return self.frame.to_dict("records")

    def strongest(self) -> pd.Series:
        """The patch with the largest |metric|."""
        return self.frame.loc[self.frame[self.metric].abs().idxmax()]

    def ranked(self, frame: pd.DataFrame | None = None) -> pd.DataFrame:
        """Rows by |metric|, largest first."""
        frame = self.frame if frame is None else frame
        return frame.reindex(frame[self.metric].abs().sort_values(ascending=False).index)

    def top_heads(self, pos: int | None = None, n: int = 3) -> list[int]:
        """The n heads with the largest |metric| (at position pos, when the sweep was per position)."""
        frame = self.frame if pos is None else self.frame[self.frame["pos"] == pos]
        return [int(h) for h in self.ranked(frame)["head"][:n]]

    def per_layer_and_head(self) -> pd.DataFrame:
        """head_out patched per position, reduced to the largest |metric| per (layer, head), sign kept."""
        f = self.frame
        if "pos" not in f or f["pos"].isna().all():
            return f
        idx = f.groupby(["layer", "head"])[self.metric].apply(lambda s: s.abs().idxmax())
        return f.loc[idx.to_numpy()].reset_index(drop=True)

    def artefact_note(self, threshold: float = 0.5) -> str | None:
        """The warning the page shows when large effects sit where the input tokens differ."""
        cells = self.artefact_cells(threshold)
        if cells.empty:
            return None
        where = ", ".join(f"L{int(r.layer)} pos {int(r.pos)}" for r in cells.head(6).itertuples())
        return (f"Large {self.metric} at positions where the clean and corrupted tokens differ ({where}). "
                "Patching there copies the swapped input token itself: it shows where the difference enters, "
                "not where it is computed. Outlined cells in the heatmap mark these positions.")

    def artefact_cells(self, threshold: float = 0.5) -> pd.DataFrame:
        """Cells with a large effect at a position where the input tokens differ (seed mistake 1)."""
        if "differs" not in self.frame:
            return self.frame.iloc[0:0]
        return self.frame[self.frame["differs"] & (self.frame[self.metric].abs() >= threshold)]


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ExplorerInputError(f"Direction must be 'denoise' or 'noise', not {direction!r}.")


def _validate(lm, tp: TokenizedPair, patches: list[Patch]) -> None:
    arch = lm.arch
    for patch in patches:
        for cell in patch:
            arch.check_layer(cell.layer)
            if cell.site == "attn_pattern":
                raise ExplorerInputError("Attention patterns are read, not patched; patch head_out instead.")
            if cell.head is not None:
                if cell.site != "head_out":
                    raise ExplorerInputError(f"A head index only applies to head_out, not {cell.site}.")
                arch.check_head(cell.layer, cell.head)
            if cell.pos != LAST:
                tp.require_same_length("Patching at chosen or all positions")
                if cell.pos is not None and not 0 <= cell.pos < tp.n_pos:
                    raise ExplorerInputError(f"Position {cell.pos} is out of range: the prompts have positions 0..{tp.n_pos - 1}.")


def _interventions(patches: list[Patch], source: dict, source_len: int, target_len: int) -> list[engine.Intervention]:
    """Row r of the target batch gets patch r: each cell's source activation written at its position."""
    writes = []
    for row, patch in enumerate(patches):
        for cell in patch:
            act = source[(cell.site, cell.layer)]  # [pos, d] or [pos, head, d_head]
            if cell.pos is None:
                src = act if cell.head is None else act[:, cell.head]
                writes.append(engine.Write(cell.site, cell.layer, row, None, cell.head, src))
            else:
                src_pos = source_len - 1 if cell.pos == LAST else cell.pos
                src = act[src_pos] if cell.head is None else act[src_pos, cell.head]
                pos = target_len - 1 if cell.pos == LAST else cell.pos
                writes.append(engine.Write(cell.site, cell.layer, row, pos, cell.head, src))
    return engine.interventions(writes)


def patched_logit_diffs(lm, tp: TokenizedPair, patches: list[Patch], direction: str = "denoise",
                        progress: Callable[[float, str], None] | None = None, fast: bool = True,
                        memory_budget_mb: float | None = None) -> np.ndarray:
    """LD of the target run with each patch applied; one value per patch. Passes are split to the memory
    budget (memory_budget_mb, else explorer.core.budget's default)."""
    _check_direction(direction)
    _validate(lm, tp, patches)
    key = result_key(lm, tp, patches, direction)
    hit = load_result(key)
    if hit is not None:
        if progress:
            progress(1.0, f"{len(patches)} patches (cached)")
        return hit
    if fast and all(len(p) == 1 for p in patches):
        out = scheduler.patched_lds(lm, tp, patches, direction, progress, memory_budget_mb=memory_budget_mb)
        save_result(key, out)
        return out
    src_ids, tgt_ids = (tp.clean_ids, tp.corrupted_ids) if direction == "denoise" else (tp.corrupted_ids, tp.clean_ids)
    reads = sorted({(c.site, c.layer) for p in patches for c in p})
    _, source = get_activations(lm, src_ids, reads)
    rows_per_pass = budget.rows_per_pass(lm, len(tgt_ids), budget.budget_bytes(lm, memory_budget_mb),
                                         max(1, scheduler.TOKEN_BUDGET // len(tgt_ids)))
    target = torch.tensor([tgt_ids], dtype=torch.long, device=HOST)
    out = np.empty(len(patches))

    def run(rows: list[int]):
        ivs = _interventions([patches[i] for i in rows], source, len(src_ids), len(tgt_ids))
        logits = engine.run(lm, target.expand(len(rows), -1), ivs).logits
        return rows, logit_diff(logits, tp.clean_answer_id, tp.corrupted_answer_id).numpy()

    for start in range(0, len(patches), rows_per_pass):
        chunk = list(range(start, min(start + rows_per_pass, len(patches))))
        for rows, lds in budget.halving_on_oom(lm, run, chunk, "a patching pass"):
            out[rows] = lds
        if progress:
            done = chunk[-1] + 1
            progress(done / len(patches), f"{done}/{len(patches)} patches")
    save_result(key, out)
    return out


def run_patches(lm, tp: TokenizedPair, patches: list[Patch], labels: list[dict], site: str, positions: str,
                direction: str = "denoise", progress=None) -> PatchResult:
    """The generic routine: patch, then tabulate with the metric and the differing-token flag."""
    ld_clean, ld_corr = pair_lds(lm, tp, require_span=True)
    lds = patched_logit_diffs(lm, tp, patches, direction, progress)
    frame = nullable_ints(pd.DataFrame(labels))
    frame["ld_patched"] = lds
    frame[metric_name(direction)] = patch_effect(lds, ld_clean, ld_corr, direction)
    if "pos" in frame:
        diff = set(tp.differing_positions) if tp.same_length else set()
        frame["token"] = ["" if pd.isna(p) else tp.clean_tokens[p] for p in frame["pos"]]
        frame["differs"] = [p in diff for p in frame["pos"]]
    if "layer" in frame:
        frame["layer_kind"] = ["" if pd.isna(l) else lm.arch.layer_kind(int(l)) for l in frame["layer"]]
    spec = make_spec("patching", lm, tp, site=site, positions=positions, direction=direction, metric=metric_name(direction),
                     cells=len(patches))
    return PatchResult(frame, site, positions, direction, ld_clean, ld_corr, tp, spec)


# ---- named variants: each only says which cells make up the sweep ----

def _positions(tp: TokenizedPair, positions: str) -> list:
    if positions not in positions_.MODES:
        raise ExplorerInputError(f"positions must be each, last or all, not {positions!r}.")
    return positions_.cells(positions, tp)


def _layers(lm, layers: Iterable[int] | None) -> list[int]:
    layers = list(range(lm.arch.n_layers)) if layers is None else list(layers)
    for layer in layers:
        lm.arch.check_layer(layer)
    return layers


def patch_sweep(lm, tp: TokenizedPair, site: str, positions: str = "each", direction: str = "denoise",
                layers: Iterable[int] | None = None, progress=None) -> PatchResult:
    """Layer x position sweep of resid_pre / resid_post / attn_out / mlp_out."""
    site = canonical_site(site)
    if site == "head_out":
        return head_sweep(lm, tp, positions, direction, layers, progress=progress)
    pos_list = _positions(tp, positions)
    patches, labels = [], []
    for layer in _layers(lm, layers):
        for pos in pos_list:
            patches.append((Cell(site, layer, pos),))
            labels.append({"layer": layer} if pos is None else {"layer": layer, "pos": tp.n_pos - 1 if pos == LAST else pos})
    return run_patches(lm, tp, patches, labels, site, positions, direction, progress)


def head_sweep(lm, tp: TokenizedPair, positions: str = "all", direction: str = "denoise",
               layers: Iterable[int] | None = None, progress=None) -> PatchResult:
    """Every head's output (input of the attention output projection), all positions or each position."""
    pos_list = _positions(tp, positions)
    patches, labels = [], []
    for layer in _layers(lm, layers):
        for head in range(lm.arch.heads_in(layer)):
            for pos in pos_list:
                patches.append((Cell("head_out", layer, pos, head),))
                label = {"layer": layer, "head": head, "head_label": lm.arch.head_label(layer, head)}
                if positions != "all":
                    label["pos"] = tp.n_pos - 1 if pos == LAST else pos
                labels.append(label)
    return run_patches(lm, tp, patches, labels, "head_out", positions, direction, progress)


@dataclass(frozen=True)
class SetPatchResult(Result):
    """A sweep repeated over the pairs of a prompt set: per-pair rows and the mean per cell."""

    _records = "summary"

    per_pair: pd.DataFrame  # pair, label columns, ld_patched, the metric
    summary: pd.DataFrame  # label columns, mean_<metric>, std_<metric>, sem_<metric>, n
    site: str
    positions: str
    direction: str
    metric: str
    skipped: list[str]  # "pair id: reason"
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    @property
    def title(self) -> str:
        where = {"last": "last position only", "all": "all positions at once"}[self.positions]
        arrow = "clean → corrupted run (denoise)" if self.direction == "denoise" else "corrupted → clean run (noise)"
        n = int(self.summary["n"].max()) if len(self.summary) else 0
        return f"{self.site} patched at {where}, {arrow}: mean {self.metric} over {n} pairs"

    def top(self, n: int = 10) -> pd.DataFrame:
        """The n cells with the largest |mean metric|."""
        mean = f"mean_{self.metric}"
        return self.summary.reindex(self.summary[mean].abs().sort_values(ascending=False).index).head(n)


def sweep_over_pairs(lm, pairs, site: str, positions: str = "all", direction: str = "denoise",
                     layers: Iterable[int] | None = None, progress=None) -> SetPatchResult:
    """The same sweep on every pair; each pair normalised by its own LD_clean - LD_corr, then averaged
    per cell (seed mistake 7: one pair is not a finding). Pairs that cannot be patched (answers that are
    not one token, unequal lengths for all-position patching, a zero span) are skipped with the reason."""
    from explorer.core.prompts import tokenize_pair

    site = canonical_site(site)
    if positions not in ("all", "last"):
        raise ExplorerInputError("Over a prompt set, patch at 'all' or 'last' positions: the pairs' positions do "
                                 "not line up.")
    frames, skipped = [], []
    for i, pair in enumerate(pairs):
        step = (lambda f, t, i=i: progress((i + f) / len(pairs), f"pair {i + 1}/{len(pairs)}: {t}")) if progress else None
        try:
            res = patch_sweep(lm, tokenize_pair(lm.tokenizer, pair), site, positions, direction, layers, step)
        except ExplorerInputError as exc:
            skipped.append(f"{pair.id}: {exc}")
            continue
        frames.append(res.frame.assign(pair=pair.id))
    if not frames:
        raise ExplorerInputError("No pair of the set could be patched: " + "; ".join(skipped[:3]))
    metric = metric_name(direction)
    keys = ["layer", "head", "head_label"] if site == "head_out" else ["layer"]
    per_pair = pd.concat(frames, ignore_index=True)
    per_pair = per_pair[["pair", *keys, "ld_patched", metric]]
    summary = per_pair.groupby(keys, as_index=False)[metric].agg(["mean", "std", "count"])
    summary = summary.rename(columns={"mean": f"mean_{metric}", "std": f"std_{metric}", "count": "n"})
    summary[f"sem_{metric}"] = summary[f"std_{metric}"] / np.sqrt(summary["n"])
    spec = make_spec("patching over a prompt set", lm, prompt_set=[p.id for p in pairs], site=site, positions=positions,
                     direction=direction, metric=metric, layers=layers)
    return SetPatchResult(per_pair, summary, site, positions, direction, metric, skipped, spec)


def parse_heads(text: str, arch) -> list[tuple[int, int]]:
    """'12.4, 12.9' or 'L12H4,L12H9' -> [(12, 4), (12, 9)], validated against the model."""
    heads = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = HEAD_LABEL.match(part.lower())
        if not m:
            raise ExplorerInputError(f"Cannot read head {part!r}; write LAYER.HEAD like 12.4 or L12H4.")
        layer, head = int(m.group(1)), int(m.group(2))
        arch.check_head(layer, head)
        heads.append((layer, head))
    if not heads:
        raise ExplorerInputError("No heads given; write LAYER.HEAD pairs like 12.4,12.9.")
    return heads


@dataclass(frozen=True)
class HeadSetResult(Result):
    _json_properties = ("superadditivity",)

    singles: PatchResult
    joint_ld: float
    joint_effect: float
    sum_of_singles: float
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    @property
    def superadditivity(self) -> float:
        """joint effect minus the sum of single-head effects (> 0: superadditive)."""
        return self.joint_effect - self.sum_of_singles


def head_set_patch(lm, tp: TokenizedPair, heads: list[tuple[int, int]], positions: str = "all",
                   direction: str = "denoise") -> HeadSetResult:
    """Each head alone and all together; the joint effect against the sum of singles."""
    pos = _positions(tp, positions)
    if len(pos) != 1:
        raise ExplorerInputError("Head sets are patched at all positions or the last position.")
    cells = [Cell("head_out", l, pos[0], h) for l, h in heads]
    patches = [(c,) for c in cells] + [tuple(cells)]
    labels = [{"layer": l, "head": h, "head_label": lm.arch.head_label(l, h)} for l, h in heads]
    labels.append({"layer": None, "head": None, "head_label": "joint"})
    res = run_patches(lm, tp, patches, labels, "head_out", positions, direction)
    metric = res.metric
    singles = PatchResult(res.frame.iloc[:-1].reset_index(drop=True), "head_out", positions, direction,
                          res.ld_clean, res.ld_corrupted, tp, res.spec)
    joint = res.frame.iloc[-1]
    spec = make_spec("head set patching", lm, tp, heads=[list(h) for h in heads], positions=positions, direction=direction,
                     metric=metric)
    return HeadSetResult(singles, float(joint["ld_patched"]), float(joint[metric]),
                         float(singles.frame[metric].sum()), spec)


def linear_heads_note(lm) -> str | None:
    kinds = {i.kind for i in lm.arch.layers_info}
    if LINEAR in kinds:
        return ("This is a hybrid model: heads in linear-attention (Gated DeltaNet) layers are value-head "
                "slots labelled LinL<layer>H<head>, not softmax attention heads.")
    return None
