"""Ablation (zero, mean, resample) of heads, attention layers, MLPs and residual positions.

Always on both runs. A shift is measured against the ablated run's own baseline
(shift = LD_ablated(R) - LD(R); seed mistake 3 measured the corrupted run against the
clean baseline). Prompt-set runs add bootstrap CIs, control-pair specificity with a
floor on the denominator, a same-size random-target baseline and a status.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from explorer import __version__

from explorer.core import budget, engine
from explorer.core.adapters import HEAD_LABEL
from explorer.core.cache import get_activations
from explorer.analyses.dataset import pair_baselines
from explorer.core.errors import ExplorerInputError
from explorer.core import positions as positions_
from explorer.core.metrics import RELATIVE_DROP_FORMULA, SHIFT_FORMULA, logit_diff
from explorer.core.results import Result, make_spec
from explorer.core.prompts import PromptPair, TokenizedPair, tokenize_pair
from explorer.core.runtime import HOST

METHODS = ("zero", "mean", "resample")
KIND_SITE = {"head": "head_out", "attn": "attn_out", "mlp": "mlp_out", "resid": "resid_post"}


@dataclass(frozen=True)
class Target:
    kind: str  # head | attn | mlp | resid
    layer: int
    head: int | None = None

    @property
    def site(self) -> str:
        return KIND_SITE[self.kind]

    def label(self, arch=None) -> str:
        if self.kind == "head":
            return arch.head_label(self.layer, self.head) if arch else f"L{self.layer}H{self.head}"
        return f"L{self.layer} {self.kind}"


_LAYER = re.compile(r"^(?:l(\d+)\s*)?(attn|mlp|resid)\s*(\d+)?$")  # attn2, L2 attn


def parse_targets(text: str, arch) -> list[Target]:
    """'L3H1, 2.0, attn2, mlp1, resid3' -> targets, each checked against the model."""
    out = []
    for raw in filter(None, (p.strip().lower() for p in text.split(","))):
        m = HEAD_LABEL.match(raw)
        if m:
            t = Target("head", int(m.group(1)), int(m.group(2)))
            arch.check_head(t.layer, t.head)
        else:
            m = _LAYER.match(raw)
            layer = (m.group(1) or m.group(3)) if m else None
            if not m or layer is None:
                raise ExplorerInputError(f"Cannot read target {raw!r}: write heads as L3H1 or 3.1, layers as attn2, "
                                         "mlp2 or resid2.")
            t = Target(m.group(2), int(layer))
            arch.check_layer(t.layer)
        out.append(t)
    if not out:
        raise ExplorerInputError("No targets given.")
    return out


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ExplorerInputError(f"Ablation method must be one of {', '.join(METHODS)}, not {method!r}.")


class Reference:
    """Where mean and resample ablations get their values: a list of reference prompts."""

    def __init__(self, lm, prompts: list[tuple[int, ...]], seed: int = 0):
        if not prompts:
            raise ExplorerInputError("Mean and resample ablation need a reference prompt set; load one first.")
        self.lm, self.prompts, self.seed = lm, prompts, seed
        self._means: dict = {}

    @classmethod
    def from_pairs(cls, lm, pairs: list[PromptPair], seed: int = 0) -> "Reference":
        return cls(lm, [tuple(lm.tokenizer(p.clean)["input_ids"]) for p in pairs], seed)

    def mean(self, target: Target) -> torch.Tensor:
        """Mean activation of the target over all positions of all reference prompts."""
        key = (target.site, target.layer, target.head)
        if key not in self._means:
            total, count = None, 0
            for ids in self.prompts:
                _, acts = get_activations(self.lm, ids, [(target.site, target.layer)])
                a = acts[(target.site, target.layer)]
                a = a[:, target.head] if target.head is not None else a
                total = a.sum(0) if total is None else total + a.sum(0)
                count += a.shape[0]
            self._means[key] = total / count
        return self._means[key]

    def resample(self, target: Target, n_pos: int, exclude: tuple, draw: int) -> torch.Tensor:
        """The target's activation [pos, ...] on a reference prompt of the same length."""
        same = [ids for ids in self.prompts if len(ids) == n_pos and ids != exclude]
        if not same:
            raise ExplorerInputError(f"Resample ablation needs a reference prompt with the same token length ({n_pos}); "
                                     "the reference set has none. Use mean ablation or another reference set.")
        ids = random.Random(f"{self.seed}:{draw}:{exclude}").choice(same)
        _, acts = get_activations(self.lm, ids, [(target.site, target.layer)])
        a = acts[(target.site, target.layer)]
        return a[:, target.head] if target.head is not None else a


def _interventions(rows_targets: list[list[Target]], method: str, positions, n_pos: int, ids: tuple,
                   reference: Reference | None, draw_base: int = 0) -> list[engine.Intervention]:
    """One intervention per (site, layer, head?) group; row r ablates rows_targets[r]."""
    pos = positions_.indices(positions, n_pos)
    writes = []
    for row, targets in enumerate(rows_targets):
        for t in targets:
            if method == "zero":
                full = None
            elif method == "mean":
                mean = reference.mean(t)
                full = mean.expand(n_pos, *mean.shape)
            else:
                full = reference.resample(t, n_pos, ids, draw_base + row)
            for p in (pos if pos is not None else [None]):
                value = 0.0 if full is None else full if p is None else full[p]  # zero ablation writes a scalar
                writes.append(engine.Write(t.site, t.layer, row, p, t.head, value))
    return engine.interventions(writes)


def ablated_lds(lm, ids: tuple, answers: tuple[int, int], rows_targets: list[list[Target]], method: str,
                positions="all", reference: Reference | None = None) -> np.ndarray:
    """LD of one prompt with each row's target set ablated (one traced pass for all rows)."""
    _check_method(method)
    if method != "zero" and reference is None:
        raise ExplorerInputError(f"{method} ablation needs a reference prompt set.")
    ivs = _interventions(rows_targets, method, positions, len(ids), tuple(ids), reference)
    batch = torch.tensor([list(ids)], device=HOST).expand(len(rows_targets), -1)
    logits = engine.run(lm, batch, ivs, options=engine.PassOptions(answers=answers)).logits
    return logit_diff(logits, 0, 1).numpy()  # the two answers' logits only


@dataclass(frozen=True)
class AblationResult(Result):
    frame: pd.DataFrame  # target, run, ld_run, ld_ablated, shift, relative_drop (clean run)
    method: str
    positions: str
    shift_formula: str = SHIFT_FORMULA
    drop_formula: str = RELATIVE_DROP_FORMULA
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    @property
    def title(self) -> str:
        return f"{self.method} ablation at {self.positions} positions: shift of LD against each run's own baseline"

    def sentences(self) -> list[str]:
        """One line per target: what the clean run keeps and how far the corrupted run moves."""
        f = self.frame
        clean, corr = f[f.run == "clean"].set_index("target"), f[f.run == "corrupted"].set_index("target")
        lines = []
        for target in clean.index:
            c, k = clean.loc[target], corr.loc[target]
            kept = f"{c['ld_ablated'] / c['ld_run']:.1%}" if c["ld_run"] else "n/a"
            lines.append(f"**{target}**: clean run keeps {kept} of its LD ({c['ld_run']:+.2f} → {c['ld_ablated']:+.2f}); "
                         f"corrupted run shifts by {k['shift']:+.2f} from its own baseline "
                         f"({k['ld_run']:+.2f} → {k['ld_ablated']:+.2f}).")
        return lines


def ablate_pair(lm, tp: TokenizedPair, targets: list[Target], method: str = "zero", positions="all",
                reference: Reference | None = None) -> AblationResult:
    """Each target alone and all together, on the clean and the corrupted run."""
    rows_targets = [[t] for t in targets] + ([list(targets)] if len(targets) > 1 else [])
    labels = [t.label(lm.arch) for t in targets] + (["combined"] if len(targets) > 1 else [])
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    rows = []
    for run, ids in (("clean", tp.clean_ids), ("corrupted", tp.corrupted_ids)):
        base_logits, _ = get_activations(lm, ids, [])
        ld_run = float(logit_diff(base_logits, *answers))
        lds = ablated_lds(lm, ids, answers, rows_targets, method, positions, reference)
        for label, ld in zip(labels, lds):
            rows.append({"target": label, "run": run, "ld_run": ld_run, "ld_ablated": float(ld),
                         "shift": float(ld) - ld_run,
                         "relative_drop": (ld_run - float(ld)) / ld_run if run == "clean" and ld_run else np.nan})
    pos_label = positions if isinstance(positions, str) else ",".join(map(str, positions))
    spec = make_spec("ablation", lm, tp, targets=labels, method=method, positions=pos_label)
    return AblationResult(pd.DataFrame(rows), method, pos_label, spec=spec)


# ---------------------------------------------------------------- prompt sets

@dataclass
class Thresholds:
    min_mean_drop: float = 1.0  # logits
    min_relative_drop: float = 0.2
    min_specificity: float = 3.0
    specificity_floor: float = 0.1  # logits; denominators below this are replaced by it
    min_control_pairs: int = 10
    min_headline_pairs: int = 20


def bootstrap_ci(values: np.ndarray, stat=np.mean, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def ratio_of_means_ci(drop, ld, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    drop, ld = np.asarray(drop, float), np.asarray(ld, float)
    if len(drop) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(drop), size=(n, len(drop)))
    stats = drop[idx].mean(1) / ld[idx].mean(1)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def _set_lds(lm, tps: list[TokenizedPair], run: str, targets: list[Target], method: str, positions,
             reference, progress=None, label: str = "", memory_budget_mb: float | None = None) -> np.ndarray:
    """Ablated LD on `run` of every pair, the pairs of one token length batched into as few traced
    passes as the memory budget allows (at most 64 rows each)."""
    out = np.empty(len(tps))
    by_len: dict[int, list[int]] = {}
    for i, tp in enumerate(tps):
        ids = tp.clean_ids if run == "clean" else tp.corrupted_ids
        by_len.setdefault(len(ids), []).append(i)
    memory = budget.budget_bytes(lm, memory_budget_mb)

    def run_rows(chunk: list[int]):
        seqs = [tps[i].clean_ids if run == "clean" else tps[i].corrupted_ids for i in chunk]
        ivs = []
        for row, i in enumerate(chunk):  # per-row values (resample differs per pair)
            for iv in _interventions([list(targets)], method, positions, len(seqs[0]), tuple(seqs[row]), reference,
                                     draw_base=i):
                iv.rows = torch.full_like(iv.rows, row)
                ivs.append(iv)
        logits = engine.run(lm, torch.tensor([list(s) for s in seqs], device=HOST), ivs).logits
        return chunk, [float(logit_diff(logits[row], tps[i].clean_answer_id, tps[i].corrupted_answer_id))
                       for row, i in enumerate(chunk)]

    done = 0
    for n_pos, idx in sorted(by_len.items()):
        step = budget.rows_per_pass(lm, n_pos, memory, 64)
        for start in range(0, len(idx), step):
            chunk = idx[start:start + step]
            for rows, lds in budget.halving_on_oom(lm, run_rows, chunk, "an ablation pass over the prompt set"):
                out[rows] = lds
            done += len(chunk)
            if progress:
                progress(done / len(tps), f"{label}{done}/{len(tps)} pairs")
    return out


@dataclass
class SetAblationResult(Result):
    _records = "per_pair"
    _json_properties = ("warnings",)

    per_pair: pd.DataFrame
    metrics: dict
    random_baseline: pd.DataFrame
    checks: list[dict]
    status: str
    params: dict
    thresholds: Thresholds
    spec: dict = field(default_factory=dict, compare=False, repr=False)  # what produced it (results.make_spec)

    @property
    def warnings(self) -> list[str]:
        return [c["message"] for c in self.checks if not c["passed"]]

    def run_card(self, lm, dataset_path: str | None, dataset_sha256: str | None) -> dict:
        return {
            "tool": "circuit-explorer", "tool_version": __version__,
            "model": {"id": lm.model_id, "weight_sha256": lm.weight_hash, "family": lm.arch.name},
            "dtype": lm.dtype, "device": lm.device,
            "dataset": {"path": dataset_path, "sha256": dataset_sha256},
            "parameters": self.params, "thresholds": asdict(self.thresholds), "metrics": self.metrics,
            "random_baseline": self.random_baseline.to_dict("records"),
            "status": self.status, "warnings": self.warnings, "checks": self.checks,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "spec": self.spec,
        }


def _random_target_sets(lm, targets: list[Target], n: int, seed: int) -> list[list[Target]]:
    """Same-size sets with the same kinds, drawn from targets not in the set."""
    rng = random.Random(seed)
    arch = lm.arch
    pools = {
        "head": [Target("head", l, h) for l in range(arch.n_layers) for h in range(arch.heads_in(l))],
        "attn": [Target("attn", l) for l in range(arch.n_layers)],
        "mlp": [Target("mlp", l) for l in range(arch.n_layers)],
        "resid": [Target("resid", l) for l in range(arch.n_layers)],
    }
    chosen = set(targets)
    sets = []
    for _ in range(n):
        s = []
        for kind in [t.kind for t in targets]:
            options = [t for t in pools[kind] if t not in chosen and t not in s]
            if not options:
                return sets
            s.append(rng.choice(options))
        sets.append(s)
    return sets


def ablate_set(lm, pairs: list[PromptPair], targets: list[Target], method: str = "mean", positions="all",
               reference_pairs: list[PromptPair] | None = None, thresholds: Thresholds | None = None,
               n_random: int = 10, n_boot: int = 1000, seed: int = 0, progress=None,
               memory_budget_mb: float | None = None) -> SetAblationResult:
    """Ablate `targets` on every pair of a prompt set, both runs, with CIs, specificity against control
    pairs and same-size random target sets. memory_budget_mb bounds each pass (see explorer.core.budget)."""
    _check_method(method)
    thresholds = thresholds or Thresholds()
    tps = [tokenize_pair(lm.tokenizer, p) for p in pairs]
    reference = None
    if method != "zero":
        reference = Reference.from_pairs(lm, reference_pairs or [p for p in pairs if p.category == "headline"], seed)
    base = pair_baselines(lm, pairs, memory_budget_mb=memory_budget_mb)
    ld_abl_clean = _set_lds(lm, tps, "clean", targets, method, positions, reference, progress, "clean run: ",
                            memory_budget_mb)
    ld_abl_corr = _set_lds(lm, tps, "corrupted", targets, method, positions, reference, progress, "corrupted run: ",
                           memory_budget_mb)
    per = base[["id", "task", "category", "ld_clean", "ld_corrupted"]].copy()
    per["ld_ablated_clean"] = ld_abl_clean
    per["ld_ablated_corrupted"] = ld_abl_corr
    per["drop_clean"] = per["ld_clean"] - per["ld_ablated_clean"]
    per["shift_clean"] = -per["drop_clean"]
    per["shift_corrupted"] = per["ld_ablated_corrupted"] - per["ld_corrupted"]
    per["relative_drop"] = per["drop_clean"] / per["ld_clean"]
    head = per[per["category"] == "headline"]
    ctrl = per[per["category"] == "control"]
    if head.empty:
        raise ExplorerInputError("The prompt set has no headline pairs to ablate.")
    drop, ld = head["drop_clean"].to_numpy(), head["ld_clean"].to_numpy()
    control_abs = float(ctrl["drop_clean"].abs().mean()) if len(ctrl) else float("nan")
    denominator = max(control_abs, thresholds.specificity_floor) if len(ctrl) else float("nan")
    metrics = {
        "n_headline": int(len(head)), "n_control": int(len(ctrl)),
        "mean_drop": float(drop.mean()), "mean_drop_ci95": bootstrap_ci(drop, n=n_boot, seed=seed),
        "relative_drop_ratio_of_means": float(drop.mean() / ld.mean()),
        "relative_drop_ratio_of_means_ci95": ratio_of_means_ci(drop, ld, n_boot, seed),
        "relative_drop_mean_of_ratios": float((drop / ld).mean()),
        "relative_drop_mean_of_ratios_ci95": bootstrap_ci(drop / ld, n=n_boot, seed=seed),
        "mean_shift_corrupted": float(head["shift_corrupted"].mean()),
        "mean_shift_corrupted_ci95": bootstrap_ci(head["shift_corrupted"].to_numpy(), n=n_boot, seed=seed),
        "control_mean_abs_drop": control_abs,
        "specificity": float(drop.mean() / denominator) if len(ctrl) else float("nan"),
        "specificity_floor": thresholds.specificity_floor,
        "specificity_denominator_floored": bool(len(ctrl) and control_abs < thresholds.specificity_floor),
    }
    random_rows = []
    headline_tps = [tp for tp, p in zip(tps, pairs) if p.category == "headline"]
    for k, rs in enumerate(_random_target_sets(lm, targets, n_random, seed)):
        lds = _set_lds(lm, headline_tps, "clean", rs, method, positions, reference,
                       memory_budget_mb=memory_budget_mb)
        random_rows.append({"sample": k, "targets": ", ".join(t.label(lm.arch) for t in rs),
                            "mean_drop": float((ld - lds).mean())})
        if progress:
            progress((k + 1) / max(1, n_random), f"random baseline {k + 1}/{n_random}")
    random_frame = pd.DataFrame(random_rows)
    metrics["random_mean_drop_mean"] = float(random_frame["mean_drop"].mean()) if len(random_frame) else float("nan")
    metrics["random_mean_drop_p95"] = float(np.percentile(random_frame["mean_drop"], 95)) if len(random_frame) else float("nan")
    checks = _checks(metrics, thresholds)
    status = "fail" if any(not c["passed"] and c["severity"] == "fail" for c in checks) else (
        "pass_with_warnings" if any(not c["passed"] for c in checks) else "pass")
    params = {"targets": [t.label(lm.arch) for t in targets], "method": method,
              "positions": positions if isinstance(positions, str) else list(positions),
              "reference": "held-out set" if reference_pairs else "clean prompts of the loaded set (headline)",
              "n_random": n_random, "n_boot": n_boot, "seed": seed}
    spec = make_spec("ablation over a prompt set", lm, prompt_set=[p.id for p in pairs], **params)
    return SetAblationResult(per, metrics, random_frame, checks, status, params, thresholds, spec)


def _checks(m: dict, t: Thresholds) -> list[dict]:
    def check(name, passed, severity, message):
        return {"name": name, "passed": bool(passed), "severity": severity, "message": message}
    lo = m["mean_drop_ci95"][0]
    return [
        check("effect", lo > 0, "fail", f"mean drop 95% CI lower bound {lo:.3f} is not above 0"),
        check("above_random", np.isnan(m["random_mean_drop_p95"]) or m["mean_drop"] > m["random_mean_drop_p95"], "fail",
              f"mean drop {m['mean_drop']:.3f} does not exceed the 95th percentile of same-size random targets "
              f"({m['random_mean_drop_p95']:.3f})"),
        check("mean_drop", m["mean_drop"] >= t.min_mean_drop, "warning",
              f"mean drop {m['mean_drop']:.3f} logits is below the {t.min_mean_drop} threshold"),
        check("relative_drop", m["relative_drop_ratio_of_means"] >= t.min_relative_drop, "warning",
              f"relative drop (ratio of means) {m['relative_drop_ratio_of_means']:.3f} is below {t.min_relative_drop}"),
        check("specificity", not np.isnan(m["specificity"]) and m["specificity"] >= t.min_specificity, "warning",
              f"specificity {m['specificity']:.2f} is below {t.min_specificity} (or no control pairs)"),
        check("control_pairs", m["n_control"] >= t.min_control_pairs, "warning",
              f"only {m['n_control']} control pairs (< {t.min_control_pairs}): the specificity denominator is noisy"),
        check("headline_pairs", m["n_headline"] >= t.min_headline_pairs, "warning",
              f"only {m['n_headline']} headline pairs (< {t.min_headline_pairs})"),
        check("floor", not m["specificity_denominator_floored"], "warning",
              f"control |drop| {m['control_mean_abs_drop']:.3f} is below the floor {t.specificity_floor}; the floor was used"),
    ]


def save_run_card(card: dict, path) -> None:
    with open(path, "w") as fh:
        json.dump(card, fh, indent=1, default=float)
