"""Altair chart builders. Each reads a tidy result frame and carries the result's title."""
from __future__ import annotations

import altair as alt
import pandas as pd

DIVERGING = "redblue"


def heatmap(frame: pd.DataFrame, x: str, y: str, value: str, title: str, x_labels: list[str] | None = None,
            subtitle: str | None = None, select: bool = True, width: int | None = None) -> alt.Chart:
    """Diverging heatmap centred at 0; exact values in tooltips; cells clickable when select=True."""
    data = frame.copy()
    x_title, y_title = x, y
    if x_labels is not None:
        data["x_label"] = [x_labels[int(i)] for i in data[x]]
        x_field = alt.X("x_label:N", sort=list(dict.fromkeys(x_labels)), title=x_title,
                        axis=alt.Axis(labelAngle=-60, labelLimit=160, labelOverlap=False))
    else:
        x_field = alt.X(f"{x}:O", title=x_title)
    limit = float(max(1e-9, data[value].abs().max()))
    tooltips = [alt.Tooltip(c, format=".4f") if pd.api.types.is_float_dtype(data[c]) else c
                for c in data.columns if c != "x_label"]
    chart = alt.Chart(data).mark_rect(stroke="white", strokeWidth=0.5).encode(
        x=x_field,
        y=alt.Y(f"{y}:O", title=y_title, sort="descending"),
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme=DIVERGING, domainMid=0, domain=[-limit, limit]),
                        title=value),
        tooltip=tooltips,
    )
    if "differs" in data:
        # Outline cells whose input tokens differ: effects there may just be the swapped token.
        marks = alt.Chart(data[data["differs"]]).mark_rect(fill=None, stroke="black", strokeWidth=2).encode(
            x=x_field, y=alt.Y(f"{y}:O", sort="descending"))
        chart = chart + marks
    # Band steps, not fixed sizes: every cell stays readable whatever the number of layers or tokens.
    params = dict(title=alt.TitleParams(title, subtitle=subtitle or ""), height=alt.Step(24),
                  width=width or alt.Step(max(18, min(40, 900 // max(1, data[x].nunique())))))
    if select:
        point = alt.selection_point(name="cell", fields=[f for f in (y, x) if f in data], on="click")
        if isinstance(chart, alt.LayerChart):
            chart.layer[0] = chart.layer[0].add_params(point)
        else:
            chart = chart.add_params(point)
    return chart.properties(**params)


def patch_heatmap(res, labels: list[str], subtitle: str = "", select: bool = True) -> alt.Chart:
    """A patching sweep as a heatmap: layer x position, layer x head, or one column for last/all positions."""
    metric, frame = res.metric, res.frame
    if res.site == "head_out" or res.site.startswith("head_out →"):
        if res.positions == "each":
            return heatmap(res.per_layer_and_head(), "head", "layer", metric,
                           res.title + " (largest |value| over positions)", subtitle=subtitle, select=select)
        return heatmap(frame, "head", "layer", metric, res.title, subtitle=subtitle, select=select)
    if res.positions == "each":
        return heatmap(frame, "pos", "layer", metric, res.title, x_labels=labels, select=select,
                       subtitle=" ".join(s for s in ("Outlined: positions where the input tokens differ.", subtitle) if s))
    return heatmap(frame.assign(where=res.positions), "where", "layer", metric, res.title, subtitle=subtitle,
                   select=select)


def set_patch_heatmap(res) -> alt.Chart:
    """A sweep over a prompt set: the mean metric per cell."""
    mean = f"mean_{res.metric}"
    if res.site == "head_out":
        return heatmap(res.summary, "head", "layer", mean, res.title, select=False)
    return heatmap(res.summary.assign(where=res.positions), "where", "layer", mean, res.title, select=False)


def line(frame: pd.DataFrame, x: str, y: str, color: str, title: str, subtitle: str | None = None) -> alt.Chart:
    return alt.Chart(frame).mark_line(point=True).encode(
        x=alt.X(f"{x}:O"), y=alt.Y(f"{y}:Q"), color=alt.Color(f"{color}:N"),
        tooltip=list(frame.columns)).properties(title=alt.TitleParams(title, subtitle=subtitle or ""), height=280)


def answer_logits(frame: pd.DataFrame, title: str) -> alt.Chart:
    """Baseline: each answer's logit on each run (frame: run, answer, token, logit, prob)."""
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("run:N", title=None), y=alt.Y("logit:Q", title="logit at the last position"),
        color=alt.Color("answer:N"), xOffset="answer:N", tooltip=list(frame.columns),
    ).properties(title=title, width=260, height=260)


def ablation_bars(frame: pd.DataFrame, title: str) -> alt.Chart:
    """Ablation shift per target on both runs, each against its own run's baseline."""
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("run:N", title=None), y=alt.Y("shift:Q", title="shift = LD_ablated(R) − LD(R)"),
        color=alt.Color("run:N", scale=alt.Scale(domain=["clean", "corrupted"], range=["#1f77b4", "#d62728"])),
        column=alt.Column("target:N", title=None), tooltip=list(frame.columns),
    ).properties(width=110, height=240, title=title)


def drop_histogram(per_pair: pd.DataFrame) -> alt.Chart:
    """Ablation over a prompt set: the per-pair clean-run drop, headline against control pairs."""
    return alt.Chart(per_pair).mark_bar(opacity=0.7).encode(
        x=alt.X("drop_clean:Q", bin=alt.Bin(maxbins=40), title="per-pair drop on the clean run (logits)"),
        y=alt.Y("count():Q", stack=None), color="category:N").properties(
        title="Per-pair distribution of the clean-run drop, headline vs control", height=240)


def token_bars(frame: pd.DataFrame, value: str, title: str) -> alt.Chart:
    """One bar per token, in the frame's order (frame: token, value, ...)."""
    return alt.Chart(frame).mark_bar().encode(x=alt.X("token:N", sort=None), y=f"{value}:Q",
                                              tooltip=list(frame.columns)).properties(title=title, height=240)


def estimate_vs_exact(frame: pd.DataFrame, estimate: str, exact: str, title: str, color: str | None = None,
                      height: int = 360) -> alt.LayerChart:
    """A first-order estimate against the exact effect, one point per cell, with the y = x line."""
    enc = dict(x=alt.X(f"{exact}:Q", title=f"exact ({exact})"), y=alt.Y(f"{estimate}:Q", title=f"estimate ({estimate})"),
               tooltip=list(frame.columns))
    if color:
        enc["color"] = f"{color}:O"
    points = alt.Chart(frame).mark_circle(size=60).encode(**enc)
    diagonal = alt.Chart(frame).mark_line(color="grey", strokeDash=[4, 4]).encode(x=f"{exact}:Q", y=f"{exact}:Q")
    return (points + diagonal).properties(title=title, height=height)


def activation_histogram(frame: pd.DataFrame, title: str) -> alt.Chart:
    """Counts per activation bin (frame: bin_lo, bin_hi, count), log-spaced bins drawn on a log axis."""
    return alt.Chart(frame[frame["count"] > 0]).mark_bar().encode(
        x=alt.X("bin_lo:Q", scale=alt.Scale(type="log"), title="activation (when firing)"), x2="bin_hi:Q",
        y=alt.Y("count:Q", title="held-out tokens"), tooltip=list(frame.columns)).properties(title=title, height=220)


def knockdown_strip(per_pair: pd.DataFrame, random: pd.DataFrame, title: str) -> alt.LayerChart:
    """Per-pair LD drops of the knocked-down latents (dots, coloured by whether they fire) beside the mean drop of
    each random set of similar frequency (grey ticks)."""
    pairs = alt.Chart(per_pair.assign(kind="target latents, per pair")).mark_circle(size=50, opacity=0.7).encode(
        x=alt.X("drop:Q", title="drop in LD (logits)"), y=alt.Y("kind:N", title=None),
        color=alt.Color("active:N", title="fires"), tooltip=list(per_pair.columns))
    rand = alt.Chart(random.assign(kind="random latents, mean per set")).mark_tick(color="grey", thickness=2).encode(
        x="mean_drop:Q", y="kind:N", tooltip=list(random.columns))
    return (pairs + rand).properties(title=title, height=140)


def dla_components(frame: pd.DataFrame, title: str) -> alt.Chart:
    """DLA of the embedding, each layer's attention and MLP (or block) and the bias terms."""
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("component:N", sort=list(frame["component"])), y=alt.Y("dla:Q", title="DLA to LD"),
        color="kind:N", tooltip=list(frame.columns)).properties(title=title, height=280)


def attention_bars(frame: pd.DataFrame, title: str) -> alt.Chart:
    """One attention row per head (frame: run, head_label, key_token, weight), clean and corrupted side by side."""
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("key_token:N", sort=None, title="key position:token (clean run tokens)", axis=alt.Axis(labelAngle=-60)),
        y=alt.Y("weight:Q", title="attention weight"), color="run:N", xOffset="run:N",
        row=alt.Row("head_label:N", title=None), tooltip=list(frame.columns),
    ).properties(width=900, height=180, title=title)


def attention_heatmaps(frame: pd.DataFrame, title: str, query_pos: int = -1, columns: int | None = None,
                       cell: int = 16) -> alt.Chart:
    """Query x key attention weights, one heatmap per head side by side (frame: head_label, query_pos,
    query_token, key_pos, key_token, weight); token labels on both axes, the exact weight on hover.
    The row of `query_pos` (where patching found the effect) is outlined. By default as many heads
    share a row as fit in about 1400 px (at most 3)."""
    order = list(dict.fromkeys(frame.sort_values("key_pos")["key_token"]))
    if columns is None:
        columns = max(1, min(3, 1400 // (cell * len(order) + 140)))
    x = alt.X("key_token:N", sort=order, title="key (attended to)",
              axis=alt.Axis(labelAngle=-60, labelLimit=120, labelOverlap=False))
    y = alt.Y("query_token:N", sort=order, title="query (attending)", axis=alt.Axis(labelLimit=120, labelOverlap=False))
    base = alt.Chart().encode(x=x, y=y)
    rects = base.mark_rect().encode(
        color=alt.Color("weight:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), title="weight"),
        tooltip=["head_label:N", "query_token:N", "key_token:N", alt.Tooltip("weight:Q", format=".4f")])
    marked = base.transform_filter(alt.datum.query_pos == query_pos).mark_rect(
        fill=None, stroke="#d62728", strokeWidth=1.5)
    n = len(order)
    return alt.layer(rects, marked, data=frame).properties(width=cell * n, height=cell * n).facet(
        facet=alt.Facet("head_label:N", title=None, sort=list(dict.fromkeys(frame["head_label"]))),
        columns=columns).properties(title=alt.TitleParams(title, subtitle=(
            f"Outlined: query row {query_pos}." if query_pos >= 0 else "")))
