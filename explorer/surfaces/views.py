"""A view as data: a page, a model, a prompt pair and the page's settings (as the URL writes them),
and how to compute its main chart without Streamlit, through the same analyses and chart builders
as the app. Stories are lists of views; the story exporter and the Story page both render them here.

Settings are the URL's text (`site=head_out`, `heads=23.3,23.0`); one left out takes the page's default.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import altair as alt
import pandas as pd

from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.core.runtime import REPO_ROOT
from explorer.surfaces import exports
from explorer.surfaces.ui import charts

PROMPTS_DIR = REPO_ROOT / "prompts"
PAIR_KEYS = ("clean", "corrupted", "clean_answer", "corrupted_answer")
# page -> (its file under pages/ (None: the home page), the panels a story may show, first = default)
PAGES = {
    "home": (None, ("baseline",)),
    "patching": ("pages/1_Patching.py", ("sweep", "layer", "path")),
    "ablation": ("pages/2_Ablation.py", ("pair",)),
    "attribution": ("pages/3_Attribution.py", ("estimate",)),
    "dla": ("pages/4_DLA.py", ("heads", "layers")),
    "lens": ("pages/5_Logit_lens.py", ("layers",)),
    "attention": ("pages/6_Attention.py", ("heatmaps", "rows")),
    "weights": ("pages/7_Weights.py", ("ov_tokens",)),
}


@dataclass(frozen=True)
class View:
    page: str
    model: str
    pair: PromptPair
    settings: dict = field(default_factory=dict)   # setting name -> URL text
    panel: str = ""                               # which of the page's charts; "" = the page's main one
    device: str = "auto"
    dtype: str = "float32"

    def url_params(self) -> dict[str, str]:
        """The app URL's query for this view (open it to continue live from a step)."""
        params = {"model": self.model, "device": self.device, "dtype": self.dtype}
        params.update({k: getattr(self.pair, k) for k in PAIR_KEYS})
        params.update({f"{self.page}.{k}": str(v) for k, v in self.settings.items()})
        return params

    def page_path(self) -> str:
        return PAGES[self.page][0] or "app.py"

    def to_dict(self) -> dict:
        out = {"page": self.page, "model": self.model, "pair": {k: getattr(self.pair, k) for k in PAIR_KEYS},
               "settings": {k: str(v) for k, v in self.settings.items()}}
        if self.panel:
            out["panel"] = self.panel
        if (self.device, self.dtype) != ("auto", "float32"):
            out.update(device=self.device, dtype=self.dtype)
        return out

    def key(self) -> str:
        """A stable text key (for caches)."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class Rendered:
    """One view computed: its chart, the frame the chart reads, and the run's spec."""
    chart: alt.TopLevelMixin
    frame: pd.DataFrame
    title: str
    caption: str
    spec: dict
    name: str   # a file-name stem for its exports


def _int(settings: dict, name: str, default: int) -> int:
    text = settings.get(name, default)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ExplorerInputError(f"Setting {name}={text!r} must be an integer.") from None


def _one_of(settings: dict, name: str, options, default: str) -> str:
    value = str(settings.get(name, default))
    if value not in options:
        raise ExplorerInputError(f"Setting {name}={value!r} must be one of {', '.join(map(str, options))}.")
    return value


def render(lm, view: View) -> Rendered:
    """Compute `view` on `lm` (its model; loading is the caller's) and build its chart."""
    if view.page not in PAGES:
        raise ExplorerInputError(f"Unknown page {view.page!r}: one of {', '.join(PAGES)}.")
    panels = PAGES[view.page][1]
    panel = view.panel or panels[0]
    if panel not in panels:
        raise ExplorerInputError(f"The {view.page} page has no panel {panel!r}: one of {', '.join(panels)}.")
    tp = tokenize_pair(lm.tokenizer, view.pair, lm.arch)
    chart, frame, title, caption, fields, result = RENDERERS[view.page](lm, tp, dict(view.settings), panel)
    fields = {**fields, "analysis": getattr(result, "spec", None)}
    spec = exports.run_spec(lm.describe(), view.pair, view.page, dict(view.settings), title=title, panel=panel,
                            **fields)
    words = [view.page, panel] + [str(fields[k]) for k in ("site", "positions", "direction") if k in fields]
    name = re.sub(r"[^A-Za-z0-9.]+", "_", "_".join(words)).strip("_")
    return Rendered(chart, frame, title, caption, spec, name)


def _home(lm, tp, settings, panel):
    from explorer.analyses.baseline import baseline
    res = baseline(lm, tp)
    title = f"Baseline: the two answers' logits (LD_clean = {res.ld_clean:+.2f}, LD_corr = {res.ld_corrupted:+.2f})"
    return charts.answer_logits(res.answers, title), res.answers, title, res.formula, {"metric": "logit"}, res


def _patching(lm, tp, settings, panel):
    from explorer.analyses.patching import head_sweep, patch_sweep
    labels = tp.position_labels()
    if panel == "path":
        from explorer.analyses.paths import parse_receiver, path_patch
        receiver = settings.get("receiver") or "logits"
        res = path_patch(lm, tp, parse_receiver(receiver, lm.arch))
        chart = charts.patch_heatmap(res, [], select=False)
        return chart, res.frame, _title(chart, res.title), res.formula, {
            "site": f"head_out → {receiver}", "positions": "all", "direction": "denoise", "metric": "recovery"}, res
    direction = _one_of(settings, "direction", ("denoise", "noise"), "denoise")
    if panel == "layer":
        layer = _int(settings, "layer", lm.arch.n_layers - 1)
        positions = "each" if tp.same_length else "last"
        res = head_sweep(lm, tp, positions, direction, [layer])
        kind = lm.arch.layer_kind(layer).replace("_", " ")
        title = f"Layer {layer} ({kind}): " + res.title
        chart = charts.heatmap(res.frame, "pos", "head", res.metric, title, x_labels=labels, select=False)
        return chart, res.frame, title, res.formula, {"site": "head_out", "positions": positions,
                                                      "direction": direction, "metric": res.metric, "layer": layer}, res
    site = _one_of(settings, "site", ("resid_post", "resid_pre", "attn_out", "mlp_out", "head_out"), "resid_post")
    offered = ("each", "last", "all") if tp.same_length else ("last",)
    positions = _one_of(settings, "positions", offered, offered[0])
    res = patch_sweep(lm, tp, site, positions, direction)
    chart = charts.patch_heatmap(res, labels, select=False)   # the Patching page's own chart
    frame = res.per_layer_and_head() if site == "head_out" and positions == "each" else res.frame
    return chart, frame, _title(chart, res.title), res.formula, {"site": site, "positions": positions,
                                                                 "direction": direction, "metric": res.metric}, res


def _title(chart, default: str) -> str:
    title = getattr(chart, "title", None)
    return getattr(title, "text", None) or (title if isinstance(title, str) else default)


def _ablation(lm, tp, settings, panel):
    from explorer.analyses.ablation import METHODS, Reference, ablate_pair, parse_targets
    from explorer.core.prompts import load_prompt_set
    targets_text = settings.get("targets") or f"L{lm.arch.n_layers // 2} attn"
    method = _one_of(settings, "method", METHODS, "zero")
    mode = _one_of(settings, "positions", ("all", "last", "chosen"), "all")
    positions = mode
    if mode == "chosen":
        chosen = str(settings.get("chosen", ""))
        positions = [int(p) for p in chosen.split(",") if p.strip()] or tp.differing_positions or [tp.n_pos - 1]
    reference = None
    if method != "zero":
        name = settings.get("reference")
        if not name:
            raise ExplorerInputError(f"{method} ablation in a story needs the setting reference=SET.jsonl.")
        reference = Reference.from_pairs(lm, load_prompt_set(PROMPTS_DIR / name).by_category("headline"))
    res = ablate_pair(lm, tp, parse_targets(targets_text, lm.arch), method, positions, reference)
    return (charts.ablation_bars(res.frame, res.title), res.frame, res.title, res.shift_formula,
            {"site": targets_text, "positions": str(positions), "direction": f"{method} ablation",
             "metric": "shift"}, res)


def _attribution(lm, tp, settings, panel):
    from explorer.analyses.attribution import ATTR_SITES, attribution_patching
    site = _one_of(settings, "site", ATTR_SITES, "head_out")
    res = attribution_patching(lm, tp)
    if site == "head_out":
        table = res.table("head_out", per_position=False)
        title = "Attribution estimate, head_out at all positions, clean → corrupted (denoise): recovery estimate"
        chart = charts.heatmap(table, "head", "layer", "estimate", title, select=False)
        positions = "all"
    else:
        table = res.table(site)
        title = f"Attribution estimate, {site} at each position, denoise: recovery estimate"
        chart = charts.heatmap(table, "pos", "layer", "estimate", title, x_labels=tp.position_labels(), select=False)
        positions = "each"
    return chart, table, title, res.formula, {"site": site, "positions": positions, "direction": "denoise",
                                              "metric": "recovery estimate"}, res


def _dla(lm, tp, settings, panel):
    from explorer.analyses.dla import dla
    run = _one_of(settings, "run", ("clean", "corrupted"), "clean")
    res = dla(lm, tp, run)
    caption = f"{res.formula}. True LD {res.ld_true:+.4f}, sum of components {res.ld_sum:+.4f} (error {res.error:+.1e})."
    fields = {"site": "direct path to the logits", "positions": "last", "direction": f"{run} run", "metric": "dla"}
    heads = res.heads()
    if panel == "heads" and not heads.empty:
        title = res.title + ": per head"
        return charts.heatmap(heads, "head", "layer", "dla", title, select=False), heads, title, caption, fields, res
    layers = res.layers()
    title = res.title + ": embedding, attention and MLP per layer"
    return charts.dla_components(layers, title), layers, title, caption, fields, res


def _lens(lm, tp, settings, panel):
    from explorer.analyses.lens import logit_lens
    res = logit_lens(lm, tp)
    chart = charts.line(res.frame, "layer", "ld", "run", res.title, subtitle="layer −1 = embedding")
    return chart, res.frame, res.title, res.formula, {"site": "resid_post", "positions": "last", "metric": "ld"}, res


def _attention(lm, tp, settings, panel):
    from explorer.analyses.attention import attention_from, attention_grid
    from explorer.analyses.patching import parse_heads
    heads = parse_heads(str(settings.get("heads") or f"{lm.arch.n_layers - 1}.0"), lm.arch)
    query = _int(settings, "pos", tp.n_pos - 1)
    caption = f"Query token: {tp.position_labels()[query]}."
    fields = {"site": "attn_pattern", "positions": f"query {query}", "metric": "attention weight"}
    if panel == "heatmaps":
        run = _one_of(settings, "run", ("clean", "corrupted"), "clean")
        n_run = len(tp.clean_ids if run == "clean" else tp.corrupted_ids)
        grid = attention_grid(lm, tp, heads, run, query if query < n_run else None)
        return (charts.attention_heatmaps(grid.frame, grid.title, grid.query_pos), grid.frame, grid.title, caption,
                {**fields, "direction": f"{run} run"}, grid)
    res = attention_from(lm, tp, heads, query)
    return charts.attention_bars(res.frame, res.title), res.frame, res.title, caption, fields, res


def _weights(lm, tp, settings, panel):
    from explorer.analyses.weights import ov_token_matrix
    layer = _int(settings, "layer", lm.arch.n_layers - 1)
    head = _int(settings, "head", 0)
    tokens = str(settings.get("tokens") or f"{tp.pair.clean_answer},{tp.pair.corrupted_answer}")
    matrix = ov_token_matrix(lm, layer, head, [t for t in tokens.split(",") if t])
    title = f"L{layer}H{head} OV: logit of each output token when attending to each input token"
    return (charts.heatmap(matrix, "output_token", "input_token", "logit", title, select=False), matrix, title,
            "OV through the embedding and the unembedding.", {"site": f"L{layer}H{head} OV", "metric": "logit"}, None)


RENDERERS = {"home": _home, "patching": _patching, "ablation": _ablation, "attribution": _attribution, "dla": _dla,
             "lens": _lens, "attention": _attention, "weights": _weights}
