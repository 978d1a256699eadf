"""The pass scheduler: runs a sweep of single-cell patches in as few, as cheap traced passes as it can.

It decides which patches need no pass, how rows are packed, which layers a pass skips and whether one
pass carries the source and target runs too, and returns one LD per patch, equal to one trace per patch.
Entry points: `patched_lds` and `clear_memo`. It is core: it may import engine, adapters, budget,
cache, calibration, errors, prompts and runtime, never an analysis (patching imports it, not the
other way round).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from explorer.core import budget, calibration, engine
from explorer.core.adapters import LINEAR
from explorer.core.cache import get_activations
from explorer.core.errors import ExplorerInputError
from explorer.core.positions import LAST
from explorer.core.prompts import TokenizedPair
from explorer.core.runtime import HOST, to_model
from explorer.core.metrics import logit_diff

TOKEN_BUDGET = 8192  # at most this many batch rows x positions per traced pass (the memory budget may say fewer)


@dataclass(frozen=True)
class Cell:
    site: str
    layer: int
    pos: int | None = None  # None: all positions; LAST: each run's last position
    head: int | None = None


Patch = tuple  # tuple[Cell, ...]: cells replaced together in one batch row


# Fast path for sweeps of single-cell patches (one position, the last, or all positions). A patch cannot
# change what it does not touch: the layers before its layer, the positions before the first position
# where the value it writes differs from the value already there, and nothing at all when the two are
# equal bit for bit (positions before the first differing token, in a pair of equal length). So:
#  - an unchanged patch is not run: its LD is the target run's;
#  - a row holds only its positions first_i..n-1 over the target run's cached keys/values before
#    first_i. Rows with one start share a batch; rows with different starts are packed end to end into
#    one sequence, where a 4D attention mask lets each token see the cached prefix before its own
#    first_i and its own row's earlier tokens, and position ids carry the real positions;
#  - a pass starts at a layer: the layers before it are skipped (fed the cached target residual), and
#    passes cover contiguous layer blocks chosen by a cost model (fixed cost per pass + FLOPs);
#  - logits: each row's last token only, the two answer rows of the unembedding only, no autograd.
# Models with recurrent (linear-attention) layers or a sliding window shorter than the prompt cannot mix
# rows in one sequence: their rows are batched at full length instead (layer skipping still applies).
# Multi-cell patches (head sets) take patching's plain batched path, the reference this one is
# tested against.
LAYER_BLOCK = None  # None: blocks chosen by _layer_blocks; an int forces a block size (tests)
PACK_TOKENS = 1024  # packed tokens per pass (the attention scores grow with its square)
# The cost model's numbers (fixed cost per pass, throughput, small-batch charge) are measured per
# device by explorer.core.calibration.
_PAIR_MEMO: dict = {}


@dataclass
class _Row:
    index: int  # position in the patch list
    cell: Cell
    first: int  # first target position whose value the patch changes
    positions: list[int]  # target positions written
    values: torch.Tensor | None  # [len(positions), ...] the source values written there
    sources: list[int] | None = None  # or the source positions they are copied from, in the same pass


def _packable(lm, n_pos: int) -> bool:
    if any(info.kind == LINEAR for info in lm.arch.layers_info):
        return False  # a recurrent state would run through every row of a packed sequence
    window = getattr(lm.torch_model.config, "sliding_window", None)
    return not window or n_pos <= window  # a custom mask replaces the sliding-window mask


def _pair_state(lm, src_ids: tuple, tgt_ids: tuple, reads: list[tuple[str, int]], want_cache: bool):
    """Source activations, target activations, target logits [vocab] and the target's key/value cache
    (a list of (keys, values) per layer), from one pass over both prompts when their lengths match."""
    key = (lm.identity, src_ids, tgt_ids, tuple(reads), want_cache)
    hit = _PAIR_MEMO.get(key)  # other sessions may replace the memo at any time: keep a local reference
    if hit is not None:
        return hit
    same = len(src_ids) == len(tgt_ids)
    ids = torch.tensor([list(src_ids), list(tgt_ids)] if same else [list(tgt_ids)], device=HOST)
    out = engine.run(lm, ids, reads=reads, options=engine.PassOptions(return_cache=want_cache))
    logits, saved, row = out.logits, out.reads, 1 if same else 0
    # Reads stay on the model's device; the cached source run (CPU, float32) joins them there.
    target = {k: v[row] for k, v in saved.items()}
    source = ({k: v[0] for k, v in saved.items()} if same else
              {k: to_model(lm, v) for k, v in get_activations(lm, src_ids, reads)[1].items()})
    kv = [(layer.keys[row:row + 1], layer.values[row:row + 1]) for layer in out.cache.layers] if want_cache else None
    hit = (source, target, logits[row], kv)
    _PAIR_MEMO.clear()  # one pair at a time is enough for a sweep
    _PAIR_MEMO[key] = hit
    return hit


def _rows(cells, source, target, n_src: int, n_tgt: int, trim: bool = True) -> list[_Row | None]:
    """What each patch writes where, trimmed to the positions it changes (None: it changes nothing).
    trim=False writes every patch in full (benchmarks and tests of the packing alone)."""
    rows = []
    for i, cell in enumerate(cells):
        src, tgt = source[(cell.site, cell.layer)], target[(cell.site, cell.layer)]
        if cell.head is not None:
            src, tgt = src[:, cell.head], tgt[:, cell.head]
        if cell.pos is None:  # all positions (equal lengths): write from the first that differs
            differs = (src != tgt).reshape(n_tgt, -1).any(1).nonzero() if trim else torch.zeros(1, 1, device=HOST)
            first = int(differs[0]) if len(differs) else None
            rows.append(None if first is None else _Row(i, cell, first, list(range(first, n_tgt)), src[first:]))
        else:
            t_pos = n_tgt - 1 if cell.pos == LAST else cell.pos
            value = src[n_src - 1 if cell.pos == LAST else cell.pos]
            unchanged = trim and torch.equal(value, tgt[t_pos])
            rows.append(None if unchanged else _Row(i, cell, t_pos, [t_pos], value[None]))
    return rows


def _token_rows(cells, n_src: int, n_tgt: int, shared: int, trim: bool = True) -> list[_Row | None]:
    """Rows from the tokens alone, for patches copied within one pass. In a causal model every site
    holds equal values in both runs at the `shared` positions before the first differing token, so
    patches there change nothing and patches over all positions start at the first differing one."""
    rows = []
    for i, cell in enumerate(cells):
        if cell.pos is None:
            first = shared if trim else 0
            rows.append(None if first >= n_tgt else
                        _Row(i, cell, first, list(range(first, n_tgt)), None, list(range(first, n_tgt))))
        else:
            t_pos, s_pos = (n_tgt - 1, n_src - 1) if cell.pos == LAST else (cell.pos, cell.pos)
            unchanged = trim and t_pos == s_pos and t_pos < shared
            rows.append(None if unchanged else _Row(i, cell, t_pos, [t_pos], None, [s_pos]))
    return rows


def _unit_costs(lm) -> tuple[float, float, calibration.PassCosts]:
    """Seconds per token per layer (matrix products), per query-key pair per layer (attention), and the
    measured costs they come from."""
    costs = calibration.pass_costs(lm)
    per_token_layer = 2 * sum(p.numel() for p in lm.sites.layer(lm.torch_model, 0).parameters()) / costs.flops_per_s
    return per_token_layer, 4 * lm.arch.d_model / costs.flops_per_s, costs


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[query, key] booleans -> the [1, 1, query, key] additive mask eager attention adds to its scores."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@dataclass(frozen=True)
class _Limits:
    """How much one pass may hold: speed caps (PACK_TOKENS, TOKEN_BUDGET) and the memory budget."""

    pack: int  # tokens of a packed pass over the target's cached prefix
    one_pass: int  # tokens of a single pass (target, source and rows; no cached prefix)
    batch: int  # rows x positions of a batch of rows that all start at one position
    memory: int  # bytes
    row_bytes: Callable[[int], int]  # a batched row starting at `first`: its tokens and its prefix copy

    @classmethod
    def of(cls, lm, n_pos: int, memory_budget_mb: float | None) -> "_Limits":
        memory = budget.budget_bytes(lm, memory_budget_mb)
        per_token, kv = budget.token_bytes(lm, n_pos), budget.kv_bytes(lm)
        return cls(pack=budget.packed_tokens(lm, memory, n_pos, PACK_TOKENS),
                   one_pass=budget.packed_tokens(lm, memory, 0, PACK_TOKENS), batch=TOKEN_BUDGET, memory=memory,
                   row_bytes=lambda first: (n_pos - first) * per_token + first * kv)


def _fill(rows: list[_Row], n_pos: int, tokens: int, limits: _Limits | None = None) -> list[list[_Row]]:
    """Consecutive rows in chunks of at most `tokens` tokens (a row holds n_pos - first; one row at
    least) and, for batches of rows with one start (limits given), within the memory budget."""
    if limits is None:
        return budget.fill(rows, lambda r: (n_pos - r.first,), (tokens,))
    return budget.fill(rows, lambda r: (n_pos - r.first, limits.row_bytes(r.first)), (tokens, limits.memory))


def _packed(chunk: list[_Row], n_pos: int, start: int = 0):
    """Rows end to end from packed index `start`: lengths, offsets (each row's first index), the real
    position of every packed token and the row it belongs to."""
    lengths = torch.tensor([n_pos - r.first for r in chunk], dtype=torch.long, device=HOST)
    offsets = start + torch.cumsum(lengths, 0) - lengths
    positions = torch.cat([torch.arange(r.first, n_pos, device=HOST) for r in chunk]
                          or [torch.zeros(0, dtype=torch.long, device=HOST)])
    return lengths, offsets, positions, torch.repeat_interleave(torch.arange(len(chunk), device=HOST), lengths)


def _one_pass_chunks(rows: list[_Row], n_tgt: int, n_fixed: int, limits: _Limits) -> list[list[_Row]]:
    """Rows per single pass, within its token limit beside the n_fixed tokens of the target and source runs."""
    return _fill(rows, n_tgt, max(1, limits.one_pass - n_fixed)) or [[]]


def _one_pass_cost(lm, rows: list[_Row], n_tgt: int, n_fixed: int, limits: _Limits) -> float:
    per_token_layer, attn_per_pair, costs = _unit_costs(lm)
    cost = 0.0
    for chunk in _one_pass_chunks(rows, n_tgt, n_fixed, limits):
        tokens = n_fixed + sum(n_tgt - r.first for r in chunk)
        cost += costs.overhead_s + lm.arch.n_layers * (per_token_layer * (tokens + costs.small_batch_tokens)
                                                       + attn_per_pair * tokens * tokens)
    return cost


def _two_pass_cost(lm, rows: list[_Row], n_src: int, n_tgt: int, limits: _Limits) -> float:
    per_token_layer, _, costs = _unit_costs(lm)
    pair = costs.overhead_s + lm.arch.n_layers * per_token_layer * (n_src + n_tgt + costs.small_batch_tokens)
    return pair + _layer_blocks(lm, rows, n_tgt, limits)[1]


def _one_pass_lds(lm, rows: list[_Row], src_ids: tuple, tgt_ids: tuple, shared: int, answers: tuple[int, int],
                  n_patches: int, limits: _Limits, progress=None) -> np.ndarray:
    """The target run, the source run and the patched rows packed into one sequence per pass; each patch
    copies the source's value at its layer, within the same forward, into its row. The source segment
    and the rows see the target segment's tokens before their first position (in place of a cached
    prefix): the source segment starts at the first differing token, as earlier positions hold the
    same values in both runs."""
    n_src, n_tgt = len(src_ids), len(tgt_ids)
    n_fixed = n_tgt + n_src - shared
    done, found, target_ld = n_patches - len(rows), {}, None

    def run(chunk: list[_Row]):
        lengths, offsets, row_positions, row_owner = _packed(chunk, n_tgt, n_fixed)
        positions = torch.cat([torch.arange(n_tgt, device=HOST), torch.arange(shared, n_src, device=HOST),
                               row_positions])
        # owner: -1 target segment, -2 source segment, j >= 0 patched row j
        owner = torch.cat([torch.full((n_tgt,), -1, device=HOST), torch.full((n_src - shared,), -2, device=HOST),
                           row_owner])
        firsts = torch.tensor([shared, 0] + [r.first for r in chunk], device=HOST)[owner + 2]
        allowed = (owner[:, None] == owner[None, :]) & (positions[None, :] <= positions[:, None])
        allowed |= (owner[:, None] != -1) & (owner[None, :] == -1) & (positions[None, :] < firsts[:, None])
        mask = _additive_mask(allowed, lm.torch_model.dtype)
        ids = torch.tensor(list(tgt_ids) + list(src_ids[shared:]) + [t for r in chunk for t in tgt_ids[r.first:]],
                           device=HOST)[None]
        # Batch row 0 is the one packed sequence: each patched row copies from the source segment.
        ivs = engine.interventions(
            engine.Write(row.cell.site, row.cell.layer, 0, int(offsets[j]) + p - row.first, row.cell.head,
                         copy_from=(0, n_tgt + s - shared if s >= shared else s))
            for j, row in enumerate(chunk) for p, s in zip(row.positions, row.sources))
        keep = torch.cat([torch.tensor([n_tgt - 1], device=HOST), offsets + lengths - 1])
        options = engine.PassOptions(keep=keep, attention_mask=mask, position_ids=positions[None], answers=answers)
        logits = engine.run(lm, ids, ivs, options=options).logits
        return chunk, logit_diff(logits[0], 0, 1).numpy()  # the pass returned the two answers' logits only

    for chunk in _one_pass_chunks(rows, n_tgt, n_fixed, limits):
        for part, lds in budget.halving_on_oom(lm, run, chunk, "a patching pass"):
            found.update({r.index: ld for r, ld in zip(part, lds[1:])})
            target_ld = lds[0]
        done += len(chunk)
        if progress:
            progress(done / n_patches, f"{done}/{n_patches} patches")
    out = np.full(n_patches, float(target_ld))  # unchanged patches: the target run's LD; float64 like other paths
    out[list(found)] = list(found.values())
    return out


def _layer_blocks(lm, rows: list[_Row], n_pos: int, limits: _Limits) -> tuple[list[list[_Row]], float]:
    """Split the rows into passes over contiguous layer blocks [a, b), each starting at layer a,
    minimising a cost model: a fixed cost per pass plus FLOPs for the tokens x layers it runs (small
    batches charged extra for their poor matmul efficiency, packed passes for their attention)."""
    n_layers = lm.arch.n_layers
    by_layer = [[r for r in rows if r.cell.layer == layer] for layer in range(n_layers)]
    if LAYER_BLOCK:
        return [[r for rs in by_layer[a:a + LAYER_BLOCK] for r in rs] for a in range(0, n_layers, LAYER_BLOCK)], 0.0
    per_token_layer, attn_per_pair, costs = _unit_costs(lm)
    per_token_bytes = budget.token_bytes(lm, n_pos)

    def cost(a: int, tokens: float, uniform: bool) -> float:
        if tokens == 0:
            return 0.0
        if uniform:  # a batch of rows of equal length
            passes = max(1.0, np.ceil(tokens / limits.batch), np.ceil(tokens * per_token_bytes / limits.memory))
            attention = attn_per_pair * tokens * n_pos
        else:  # packed: every packed token is scored against the whole pass
            passes = max(1.0, np.ceil(tokens / limits.pack))
            attention = attn_per_pair * tokens * (n_pos + tokens / passes)
        return passes * costs.overhead_s + (n_layers - a) * (
            per_token_layer * (tokens + passes * costs.small_batch_tokens) + attention)

    best = [0.0] + [np.inf] * n_layers
    cut = [0] * (n_layers + 1)
    for b in range(1, n_layers + 1):
        tokens, firsts = 0.0, set()
        for a in range(b - 1, -1, -1):  # block [a, b)
            tokens += sum(n_pos - r.first for r in by_layer[a])
            firsts.update(r.first for r in by_layer[a])
            c = best[a] + cost(a, tokens, len(firsts) <= 1)
            if c < best[b]:
                best[b], cut[b] = c, a
    blocks, b = [], n_layers
    while b > 0:
        blocks.append([r for rs in by_layer[cut[b]:b] for r in rs])
        b = cut[b]
    return [blk for blk in reversed(blocks) if blk], best[n_layers]


def _chunks(block: list[_Row], n_pos: int, limits: _Limits) -> list[list[_Row]]:
    """Bound one pass: packed tokens, or batch rows x positions and their bytes."""
    if len({r.first for r in block}) > 1:
        return _fill(block, n_pos, limits.pack)
    return _fill(block, n_pos, limits.batch, limits)


def _run_pass(lm, chunk: list[_Row], tgt_ids: torch.Tensor, target: dict, full_kv, answers: tuple[int, int]
              ) -> torch.Tensor:
    """LD of each row of one pass (answers: the clean and corrupted answer ids). Rows that all start at
    one position form a batch over the shared key/value prefix; rows that start at different positions
    are packed into one sequence."""
    n_pos, n_rows = len(tgt_ids), len(chunk)
    start = min(r.cell.layer for r in chunk)
    n_past = max(r.first for r in chunk)
    packed = len({r.first for r in chunk}) > 1
    mask = position_ids = keep = None
    if packed:  # row i occupies packed indices offset_i .. offset_i + n - first_i - 1
        lengths, offsets, positions, owner = _packed(chunk, n_pos)
        firsts = torch.tensor([r.first for r in chunk], device=HOST)
        sees_past = torch.arange(n_past, device=HOST)[None, :] < firsts[owner][:, None]
        sees_row = (owner[:, None] == owner[None, :]) & (positions[None, :] <= positions[:, None])
        allowed = torch.cat([sees_past, sees_row], 1)
        mask = _additive_mask(allowed, lm.torch_model.dtype)
        ids, keep, position_ids, batch = tgt_ids[positions][None], offsets + lengths - 1, positions[None], 1
        where = lambda j, p: (0, int(offsets[j]) + p - chunk[j].first)
    else:  # one batch row each, all starting at position n_past
        positions = torch.arange(n_past, n_pos, device=HOST)
        ids, batch = tgt_ids[n_past:].expand(n_rows, -1), n_rows
        where = lambda j, p: (j, p - n_past)
    cache = None
    if n_past:
        from transformers import DynamicCache
        cache = DynamicCache()
        for index, (keys, values) in enumerate(full_kv):
            cache.update(keys[..., :n_past, :].expand(batch, -1, -1, -1).contiguous(),
                         values[..., :n_past, :].expand(batch, -1, -1, -1).contiguous(), index)
    ivs = engine.interventions(engine.Write(row.cell.site, row.cell.layer, *where(j, p), row.cell.head, value)
                               for j, row in enumerate(chunk) for p, value in zip(row.positions, row.values))
    skip_value = None
    if start > 0:  # a fresh copy: patches at resid_pre[start] write into it in place
        skip_value = target[("resid_post", start - 1)][positions][None].expand(batch, -1, -1).clone()
    options = engine.PassOptions(skip_layers=start, skip_value=skip_value, past_key_values=cache, keep=keep,
                                 attention_mask=mask, position_ids=position_ids, answers=answers)
    logits = engine.run(lm, ids, ivs, options=options).logits
    return logit_diff(logits[0] if packed else logits, 0, 1)  # the two answers' logits only


def _shared_prefix(a: tuple, b: tuple) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def clear_memo() -> None:
    """Forget the memoised source/target runs (benchmarks time cold runs; tests free memory)."""
    _PAIR_MEMO.clear()


def patched_lds(lm, tp: TokenizedPair, patches: list[Patch], direction: str, progress=None, *,
                trim: bool = True, one_pass: bool | None = None, memory_budget_mb: float | None = None) -> np.ndarray:
    """LD of the target run with each patch applied (one value per patch, float64). Every patch is one
    cell; the caller validates cells and direction. progress(fraction, text) is called after each pass.
    trim=False runs every patch in full (benchmarks and tests of the packing alone). one_pass: True/False
    forces the single packed pass or the two-stage path; None lets the cost model choose (one pass wins
    where a traced pass's fixed cost outweighs the layers it cannot skip). memory_budget_mb bounds each
    pass (default: explorer.core.budget's, from the device's free memory)."""
    if any(len(p) != 1 for p in patches):
        raise ExplorerInputError("The pass scheduler runs single-cell patches; patch sets take the batched path.")
    src_ids, tgt_ids = (tp.clean_ids, tp.corrupted_ids) if direction == "denoise" else (tp.corrupted_ids, tp.clean_ids)
    src_ids, tgt_ids = tuple(src_ids), tuple(tgt_ids)
    n_layers, n_src, n_tgt = lm.arch.n_layers, len(src_ids), len(tgt_ids)
    cells = [p[0] for p in patches]
    a, b = tp.clean_answer_id, tp.corrupted_answer_id
    packed = _packable(lm, max(n_src, n_tgt))
    limits = _Limits.of(lm, n_tgt, memory_budget_mb)
    if packed and one_pass is not False:
        shared = _shared_prefix(src_ids, tgt_ids)
        rows = [r for r in _token_rows(cells, n_src, n_tgt, shared, trim) if r is not None]
        n_fixed = n_tgt + n_src - shared
        single = _one_pass_cost(lm, rows, n_tgt, n_fixed, limits)
        if one_pass or single < _two_pass_cost(lm, rows, n_src, n_tgt, limits):
            return _one_pass_lds(lm, rows, src_ids, tgt_ids, shared, (a, b), len(patches), limits, progress)
    reads = sorted({(c.site, c.layer) for c in cells} | {("resid_post", l) for l in range(n_layers - 1)})
    source, target, tgt_logits, full_kv = _pair_state(lm, src_ids, tgt_ids, reads, packed)
    out = np.full(len(patches), float(tgt_logits[a] - tgt_logits[b]))  # unchanged patches: the target's LD
    todo = [r for r in _rows(cells, source, target, n_src, n_tgt, trim) if r is not None]
    if not packed:
        todo = [_Row(r.index, r.cell, 0, r.positions, r.values) for r in todo]
    chunks = [c for block in _layer_blocks(lm, todo, n_tgt, limits)[0] for c in _chunks(block, n_tgt, limits)]
    ids, done = torch.tensor(list(tgt_ids), device=HOST), len(patches) - len(todo)
    run = lambda chunk: (chunk, _run_pass(lm, chunk, ids, target, full_kv, (a, b)).numpy())  # noqa: E731
    for chunk in chunks:
        for part, lds in budget.halving_on_oom(lm, run, chunk, "a patching pass"):
            out[[r.index for r in part]] = lds
        done += len(chunk)
        if progress:
            progress(done / len(patches), f"{done}/{len(patches)} patches")
    return out
