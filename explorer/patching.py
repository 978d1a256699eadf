"""Activation patching: one generic engine, thin named variants.

A sweep is a list of patches; each patch is a tuple of cells (site, layer, position,
head) copied together from the source run into the target run. Denoise copies clean
activations into the corrupted run (metric: recovery); noise copies corrupted into
clean (metric: damage). Many patches share one traced forward pass, one batch row each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from explorer import engine
from explorer.adapters import HEAD_LABEL, LINEAR, canonical_site
from explorer.baseline import pair_lds
from explorer.cache import get_activations, load_result, result_key, save_result
from explorer.errors import ExplorerInputError
from explorer.metrics import metric_formula, metric_name, patch_effect
from explorer.prompts import TokenizedPair

LAST = -1  # position sentinel: the last position of each run (works for unequal lengths)
DIRECTIONS = ("denoise", "noise")
TOKEN_BUDGET = 8192  # batch rows x positions per traced pass; bounds activation memory


@dataclass(frozen=True)
class Cell:
    site: str
    layer: int
    pos: int | None = None  # None: all positions; LAST: each run's last position
    head: int | None = None


Patch = tuple  # tuple[Cell, ...]: cells replaced together in one batch row


@dataclass(frozen=True)
class PatchResult:
    """One row per patch: layer/pos/head/token columns plus ld_patched and the metric."""

    frame: pd.DataFrame
    site: str
    positions: str  # "each", "last" or "all"
    direction: str
    ld_clean: float
    ld_corrupted: float
    pair: TokenizedPair
    metric: str = field(init=False)
    formula: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "metric", metric_name(self.direction))
        object.__setattr__(self, "formula", metric_formula(self.direction))

    @property
    def title(self) -> str:
        """Every chart says site, positions, direction and metric (seed mistake 2)."""
        where = {"each": "each position", "last": "last position only", "all": "all positions at once"}[self.positions]
        arrow = "clean → corrupted run (denoise)" if self.direction == "denoise" else "corrupted → clean run (noise)"
        return f"{self.site} patched at {where}, {arrow}: {self.metric}"

    def to_records(self) -> list[dict]:
        return self.frame.to_dict("records")

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
    groups: dict = {}
    for row, patch in enumerate(patches):
        for cell in patch:
            kind = (cell.site, cell.layer, cell.pos is None, cell.head is not None)
            g = groups.setdefault(kind, {"rows": [], "pos": [], "heads": [], "values": []})
            act = source[(cell.site, cell.layer)]  # [pos, d] or [pos, head, d_head]
            if cell.pos is None:
                src = act if cell.head is None else act[:, cell.head]
            else:
                src_pos = source_len - 1 if cell.pos == LAST else cell.pos
                src = act[src_pos] if cell.head is None else act[src_pos, cell.head]
                g["pos"].append(target_len - 1 if cell.pos == LAST else cell.pos)
            g["rows"].append(row)
            g["heads"].append(cell.head)
            g["values"].append(src)
    out = []
    for (site, layer, all_pos, has_head), g in groups.items():
        out.append(engine.Intervention(
            site=site, layer=layer, rows=torch.tensor(g["rows"]),
            pos=None if all_pos else torch.tensor(g["pos"]),
            heads=torch.tensor(g["heads"]) if has_head else None,
            value=torch.stack(g["values"])))
    return out


# Fast path for sweeps of single-cell patches (one position, the last, or all positions). A patch at
# (layer l, position p) cannot change layers before l or positions before p, so rows patched at
# layers [r, r+LAYER_BLOCK) and positions [p0, p0+POS_CHUNK) share one pass that skips layers < r
# (fed the cached target residual) and reuses the target run's keys/values for positions < p0.
# Logits: last position only. Multi-cell patches (head sets) take the plain batched path below,
# which is also the reference the fast path is tested against.
LAYER_BLOCK = None  # None: chosen per sweep by _choose_blocks; an int forces a block size (tests)
POS_CHUNK = None
TRACE_OVERHEAD_S = 0.006  # fixed cost of one traced pass on CPU (measured: 5-10 ms)
FLOPS_PER_S = 4e10  # one CPU thread, fp32 matmuls
SMALL_BATCH_TOKENS = 32  # a pass over n token rows costs about (1 + this / n) times its FLOPs
_KV_MEMO: dict = {}


def _fast_path_ok(lm, patches: list[Patch]) -> bool:
    return all(len(p) == 1 for p in patches)


def _choose_blocks(lm, cells_lp: list[tuple[int, int]], n_pos: int) -> tuple[int, int]:
    """Pick (layer block, position chunk) minimising a simple cost model: a fixed cost per
    traced pass plus FLOPs for the rows x positions x layers it runs, with small batches
    (a few dozen token rows per matmul) charged extra for their poor efficiency on CPU."""
    if LAYER_BLOCK and POS_CHUNK:
        return LAYER_BLOCK, POS_CHUNK
    n_layers = lm.arch.n_layers
    per_token_layer = 2 * sum(p.numel() for p in lm.sites.layer(lm.torch_model, 0).parameters()) / FLOPS_PER_S
    best = None
    for lb in sorted({1, 2, 3, 4, 6, 8, n_layers}):
        for pc in sorted({1, 2, 3, 4, 6, 8, n_pos}):
            groups: dict = {}
            for layer, pos in cells_lp:
                groups.setdefault((layer // lb * lb, pos // pc * pc), []).append(1)
            cost = 0.0
            for (start, p0), members in groups.items():
                tokens = len(members) * (n_pos - p0)
                cost += TRACE_OVERHEAD_S + per_token_layer * tokens * (n_layers - start) * (1 + SMALL_BATCH_TOKENS / tokens)
            if best is None or cost < best[0]:
                best = (cost, lb, pc)
    return best[1], best[2]


def _target_kv(lm, ids: tuple):
    """The target run's key/value cache (memoised per model and prompt)."""
    key = (lm.identity, ids)
    kv = _KV_MEMO.get(key)  # other sessions may replace the memo at any time: keep a local reference
    if kv is None:
        with lm.lock, torch.no_grad():
            with lm.nn.trace(torch.tensor([list(ids)], device=lm.device), use_cache=True, logits_to_keep=1):
                out = lm.nn.output.save()
        lm.forward_calls += 1
        kv = out.past_key_values
        _KV_MEMO.clear()  # one prompt's cache at a time is enough for a sweep
        _KV_MEMO[key] = kv
    return kv


def _prefix_cache(full, p0: int, rows: int):
    from transformers import DynamicCache
    cache = DynamicCache()
    for index, layer in enumerate(full.layers):
        cache.update(layer.keys[:, :, :p0].expand(rows, -1, -1, -1).contiguous(),
                     layer.values[:, :, :p0].expand(rows, -1, -1, -1).contiguous(), index)
    return cache


def _fast_lds(lm, tp: TokenizedPair, patches: list[Patch], direction: str, progress=None) -> np.ndarray:
    src_ids, tgt_ids = (tp.clean_ids, tp.corrupted_ids) if direction == "denoise" else (tp.corrupted_ids, tp.clean_ids)
    n_layers, n_tgt, n_src = lm.arch.n_layers, len(tgt_ids), len(src_ids)
    cells = [p[0] for p in patches]
    tgt_pos = [n_tgt - 1 if c.pos == LAST else c.pos for c in cells]  # None: all positions
    src_pos = [n_src - 1 if c.pos == LAST else c.pos for c in cells]
    _, source = get_activations(lm, src_ids, sorted({(c.site, c.layer) for c in cells}))
    reuse_prefix = all(info.kind != LINEAR for info in lm.arch.layers_info)  # recurrent state has no per-position cache
    first = [0 if p is None or not reuse_prefix else p for p in tgt_pos]  # first position a patch can change
    layer_block, pos_chunk = _choose_blocks(lm, [(c.layer, f) for c, f in zip(cells, first)], n_tgt)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault((cell.layer // layer_block * layer_block, first[i] // pos_chunk * pos_chunk), []).append(i)
    out = np.empty(len(patches))
    done = 0
    target_ids = torch.tensor([list(tgt_ids)])
    # The target's residuals and key/value cache cost a pass each: fetch them only if a group uses them.
    target = None
    if any(start > 0 for start, _ in groups):
        _, target = get_activations(lm, tgt_ids, [("resid_post", l) for l in range(n_layers)])
    full_kv = _target_kv(lm, tgt_ids) if any(p0 > 0 for _, p0 in groups) else None
    chunks = []
    for (start, p0), idx in sorted(groups.items()):  # bound rows x positions per pass (memory)
        step = max(1, TOKEN_BUDGET // max(1, n_tgt - p0))
        chunks += [((start, p0), idx[k:k + step]) for k in range(0, len(idx), step)]
    for (start, p0), idx in chunks:
        rows = len(idx)
        by_kind: dict = {}
        for row, i in enumerate(idx):
            cell = cells[i]
            every = tgt_pos[i] is None
            g = by_kind.setdefault((cell.site, cell.layer, cell.head is not None, every), ([], [], [], []))
            act = source[(cell.site, cell.layer)]  # [pos, ...]
            act = act[p0:] if every else act[src_pos[i]]
            g[0].append(row)
            g[1].append(None if every else tgt_pos[i] - p0)
            g[2].append(cell.head)
            g[3].append(act if cell.head is None else act[..., cell.head, :])
        ivs = [engine.Intervention(site, layer, torch.tensor(g[0]), None if every else torch.tensor(g[1]),
                                   torch.stack(g[3]), torch.tensor(g[2]) if has_head else None)
               for (site, layer, has_head, every), g in by_kind.items()]
        skip_value = None
        if start > 0:  # a fresh copy: patches at resid_pre[start] write into it in place
            skip_value = target[("resid_post", start - 1)][p0:].unsqueeze(0).expand(rows, -1, -1).clone()
        cache = _prefix_cache(full_kv, p0, rows) if p0 > 0 else None
        logits, _ = engine.run(lm, target_ids[:, p0:].expand(rows, -1), ivs, skip_layers=start,
                               skip_value=skip_value, past_key_values=cache)
        out[idx] = (logits[:, tp.clean_answer_id] - logits[:, tp.corrupted_answer_id]).cpu().numpy()
        done += rows
        if progress:
            progress(done / len(patches), f"{done}/{len(patches)} patches")
    return out


def patched_logit_diffs(lm, tp: TokenizedPair, patches: list[Patch], direction: str = "denoise",
                        progress: Callable[[float, str], None] | None = None, fast: bool = True) -> np.ndarray:
    """LD of the target run with each patch applied; one value per patch."""
    _check_direction(direction)
    _validate(lm, tp, patches)
    key = result_key(lm, tp, patches, direction)
    hit = load_result(key)
    if hit is not None:
        if progress:
            progress(1.0, f"{len(patches)} patches (cached)")
        return hit
    if fast and _fast_path_ok(lm, patches):
        out = _fast_lds(lm, tp, patches, direction, progress)
        save_result(key, out)
        return out
    src_ids, tgt_ids = (tp.clean_ids, tp.corrupted_ids) if direction == "denoise" else (tp.corrupted_ids, tp.clean_ids)
    reads = sorted({(c.site, c.layer) for p in patches for c in p})
    _, source = get_activations(lm, src_ids, reads)
    rows_per_pass = max(1, TOKEN_BUDGET // len(tgt_ids))
    target = torch.tensor([tgt_ids], dtype=torch.long)
    out = np.empty(len(patches))
    for start in range(0, len(patches), rows_per_pass):
        chunk = patches[start:start + rows_per_pass]
        ivs = _interventions(chunk, source, len(src_ids), len(tgt_ids))
        logits, _ = engine.run(lm, target.expand(len(chunk), -1), ivs)
        out[start:start + len(chunk)] = (logits[:, tp.clean_answer_id] - logits[:, tp.corrupted_answer_id]).cpu().numpy()
        if progress:
            done = min(start + len(chunk), len(patches))
            progress(done / len(patches), f"{done}/{len(patches)} patches")
    save_result(key, out)
    return out


def run_patches(lm, tp: TokenizedPair, patches: list[Patch], labels: list[dict], site: str, positions: str,
                direction: str = "denoise", progress=None) -> PatchResult:
    """The generic routine: patch, then tabulate with the metric and the differing-token flag."""
    ld_clean, ld_corr = pair_lds(lm, tp, require_span=True)
    lds = patched_logit_diffs(lm, tp, patches, direction, progress)
    frame = pd.DataFrame(labels)
    frame["ld_patched"] = lds
    frame[metric_name(direction)] = patch_effect(lds, ld_clean, ld_corr, direction)
    if "pos" in frame:
        diff = set(tp.differing_positions) if tp.same_length else set()
        frame["token"] = [tp.clean_tokens[p] if p is not None and p >= 0 else "" for p in frame["pos"]]
        frame["differs"] = [p in diff for p in frame["pos"]]
    if "layer" in frame:
        frame["layer_kind"] = [lm.arch.layer_kind(int(l)) for l in frame["layer"]]
    return PatchResult(frame, site, positions, direction, ld_clean, ld_corr, tp)


# ---- named variants: each only says which cells make up the sweep ----

def _positions(tp: TokenizedPair, positions: str) -> list[int | None]:
    if positions == "each":
        tp.require_same_length("Per-position patching")
        return list(range(tp.n_pos))
    if positions == "last":
        return [LAST]
    if positions == "all":
        tp.require_same_length("All-position patching")
        return [None]
    raise ExplorerInputError(f"positions must be each, last or all, not {positions!r}.")


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
class HeadSetResult:
    singles: PatchResult
    joint_ld: float
    joint_effect: float
    sum_of_singles: float

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
    labels.append({"layer": -1, "head": -1, "head_label": "joint"})
    res = run_patches(lm, tp, patches, labels, "head_out", positions, direction)
    metric = res.metric
    singles = PatchResult(res.frame.iloc[:-1].reset_index(drop=True), "head_out", positions, direction,
                          res.ld_clean, res.ld_corrupted, tp)
    joint = res.frame.iloc[-1]
    return HeadSetResult(singles, float(joint["ld_patched"]), float(joint[metric]),
                         float(singles.frame[metric].sum()))


def linear_heads_note(lm) -> str | None:
    kinds = {i.kind for i in lm.arch.layers_info}
    if LINEAR in kinds:
        return ("This is a hybrid model: heads in linear-attention (Gated DeltaNet) layers are value-head "
                "slots labelled LinL<layer>H<head>, not softmax attention heads.")
    return None
