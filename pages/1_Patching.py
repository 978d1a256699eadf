"""Activation patching: layer x position, components, heads, head sets; click to drill down."""
import time

import streamlit as st

from explorer.core.errors import ExplorerInputError
from explorer.analyses.patching import (head_set_patch, head_sweep, linear_heads_note, parse_heads, patch_sweep,
                               sweep_over_pairs)
from explorer.core.prompts import check_for_tokenizer
from explorer.surfaces.ui import charts, state, widgets

SITES = ["resid_post", "resid_pre", "attn_out", "mlp_out", "head_out"]
NO_LAYER = "—"


def main(lm, tp) -> None:
    positions_offered = ["each", "last", "all"] if tp.same_length else ["last"]
    c1, c2, c3 = st.columns(3)
    site = widgets.choice(c1, "Site", "site", SITES,
                          help="resid_pre/resid_post: residual stream before/after the layer; attn_out/mlp_out: "
                               "what the attention/MLP block writes; head_out: one head's output (input of the "
                               "output projection).")
    positions = widgets.choice(c2, "Positions", "positions", positions_offered,
                               help="each: one patch per (layer, position); last: the final position only; all: "
                                    "every position at once (at layer 0 this swaps the differing input token itself).")
    direction = widgets.choice(c3, "Direction", "direction", ["denoise", "noise"],
                               help="denoise: clean activations into the corrupted run (recovery). noise: corrupted "
                                    "into clean (damage).")
    if not tp.same_length:
        st.info("The prompts differ in token length, so only last-position patching is offered.")
    note = linear_heads_note(lm)
    if note and site == "head_out":
        st.info(note)

    progress = widgets.progress_callback("Patching")
    started = time.perf_counter()
    try:
        res = patch_sweep(lm, tp, site, positions, direction, progress=progress)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()
    elapsed = time.perf_counter() - started

    metric = res.metric
    st.caption(f"{res.formula} · LD_clean = {res.ld_clean:+.3f}, LD_corr = {res.ld_corrupted:+.3f} · "
               f"{len(res.frame)} patches in {elapsed * 1e3:.0f} ms")
    if note := res.artefact_note():
        st.warning(note)
    labels = tp.position_labels()
    chart = charts.patch_heatmap(res, labels, "Click a cell to open that layer's heads below.")
    event = st.altair_chart(chart, on_select="rerun", key="patch_chart")
    widgets.export_buttons(res.frame, f"patching_{site}_{positions}_{direction}", res.meta(), chart=chart)
    drill_down(lm, tp, direction, metric, labels, event)
    over_a_prompt_set(lm, site, direction, metric)
    head_set(lm, tp, direction, metric)
    path_patching(lm, tp)


def clicked_layer(event) -> int | None:
    """The layer of the heatmap cell the user clicked last, if any."""
    selection = getattr(event, "selection", None) or {}
    cells = selection.get("cell") or []
    return int(cells[0]["layer"]) if cells and "layer" in cells[0] else None


def drill_down(lm, tp, direction, metric, labels, event) -> None:
    """A layer -> its heads at each position; the strongest head -> its attention and DLA."""
    st.subheader("Drill down")
    layers = [NO_LAYER] + list(range(lm.arch.n_layers))
    clicked = clicked_layer(event)
    s = state.store()
    # A click opens its layer once; the selectbox stays the user's to change afterwards.
    if clicked is not None and s.values.get("patching.last_click") != clicked:
        state.set_page_value("layer", clicked)
    s.values["patching.last_click"] = clicked
    layer_pick = widgets.setting(st.selectbox, "Layer to open (or click a heatmap cell)", "layer", NO_LAYER,
                                 parse=lambda v: NO_LAYER if v == NO_LAYER else int(v), valid=layers.__contains__,
                                 options=layers)
    if layer_pick == NO_LAYER:
        return
    layer = int(layer_pick)
    head_positions = "each" if tp.same_length else "last"
    try:
        heads = head_sweep(lm, tp, head_positions, direction, [layer])
    except ExplorerInputError as exc:
        state.show_error(exc)
        return
    kind = lm.arch.layer_kind(layer).replace("_", " ")
    st.altair_chart(charts.heatmap(heads.frame, "pos", "head", metric, f"Layer {layer} ({kind}): " + heads.title,
                                   x_labels=labels, select=False))
    best = heads.strongest()
    head, pos = int(best["head"]), int(best["pos"])
    st.markdown(f"Strongest head cell: **{best['head_label']}** at position {pos} "
                f"({labels[pos]}), {metric} = {best[metric]:+.3f}.")
    top = heads.top_heads(pos)  # the layer's strongest heads at that position, strongest first
    c1, c2 = st.columns(2)
    widgets.attention_link(c1, lm, [(layer, h) for h in top], pos, f"top |{metric}| heads there")
    c2.page_link("pages/4_DLA.py", label=f"Direct logit attribution of {best['head_label']}",
                 query_params=state.url_params(**{"dla.layer": layer, "dla.head": head}))


def over_a_prompt_set(lm, site, direction, metric) -> None:
    """The same sweep over a prompt set: one pair is not a finding."""
    st.subheader(f"Over a prompt set: mean {metric} per cell")
    st.caption("The sweep above (same site and direction) on every headline pair of a set, each pair normalised by "
               "its own LD_clean − LD_corr, then averaged per cell. Positions: all or last, since the pairs' "
               "positions do not line up.")
    with st.form("patch_set"):
        c1, c2, c3 = st.columns(3)
        set_name = widgets.choice(c1, "Prompt set", "set_name", widgets.prompt_set_choices(lm), url=False, form=True)
        n_pairs = widgets.integer(c2, "Headline pairs", "set_pairs", 12, 1, 500, url=False, form=True)
        set_positions = widgets.choice(c3, "Positions", "set_positions", ["all", "last"], url=False, form=True)
        widgets.unfit_sets_caption(lm)
        run_set = widgets.submit_button("Run over the set")
    if not run_set:
        return
    try:
        ps = check_for_tokenizer(widgets.load_set(set_name), lm.tokenizer)
        pairs = ps.by_category("headline")[: int(n_pairs)]
        with st.status(f"Patching {len(pairs)} pairs ...", expanded=True):
            set_res = sweep_over_pairs(lm, pairs, site, set_positions, direction,
                                       progress=widgets.progress_callback("Prompt set"))
    except ExplorerInputError as exc:
        state.show_error(exc)
        return
    skipped = ps.errors + set_res.skipped
    if skipped:
        st.warning(f"{len(skipped)} pair(s) skipped: " + "; ".join(skipped[:5]))
    set_chart = charts.set_patch_heatmap(set_res)
    st.altair_chart(set_chart)
    st.dataframe(set_res.top(10), hide_index=True)
    widgets.export_buttons(set_res.per_pair, f"patching_set_{site}_{set_positions}_{direction}",
                           {**set_res.meta(), "prompt_set": set_name, "sha256": ps.sha256, "skipped": skipped},
                           chart=set_chart)


def head_set(lm, tp, direction, metric) -> None:
    """Joint effect of a set of heads against the sum of single-head effects."""
    st.subheader("Head set: joint effect vs sum of single-head effects")
    text = widgets.setting(st.text_input, "Heads (LAYER.HEAD, comma-separated)", "heads", "",
                           placeholder="e.g. 2.1, 3.4")
    if not text:
        return
    try:
        heads = parse_heads(text, lm.arch)
        set_pos = "all" if tp.same_length else "last"
        hs = head_set_patch(lm, tp, heads, set_pos, direction)
    except ExplorerInputError as exc:
        state.show_error(exc)
        return
    st.dataframe(hs.singles.frame[["head_label", "ld_patched", metric]], hide_index=True)
    c1, c2, c3 = st.columns(3)
    c1.metric(f"Joint {metric}", f"{hs.joint_effect:.3f}")
    c2.metric(f"Sum of single {metric}", f"{hs.sum_of_singles:.3f}")
    c3.metric("Joint − sum (superadditivity)", f"{hs.superadditivity:+.3f}")
    st.caption(f"{hs.singles.title}. Heads patched at {set_pos} positions, alone and together.")


def path_patching(lm, tp) -> None:
    """Senders routed only through one receiver."""
    from explorer.analyses.paths import parse_receiver, path_patch

    st.subheader("Path patching: which heads feed a receiver")
    st.caption("Each sender head's output is set to its clean value; only its direct write into the receiver is "
               "kept (receiver = a later head's query/key/value input, or the logits through the final residual). "
               "Metric: recovery = (LD_patched − LD_corr) / (LD_clean − LD_corr). For GQA models, k and v belong "
               "to the shared key/value head of the receiver's group.")
    receiver_text = widgets.setting(st.text_input, "Receiver (logits, or LAYER.HEAD.q|k|v)", "receiver", "",
                                    placeholder="e.g. logits or 3.1.q")
    if not receiver_text:
        return
    try:
        path_res = path_patch(lm, tp, parse_receiver(receiver_text, lm.arch))
    except ExplorerInputError as exc:
        state.show_error(exc)
        return
    path_chart = charts.patch_heatmap(path_res, [], select=False)
    st.altair_chart(path_chart)
    widgets.export_buttons(path_res.frame, "path_patching", path_res.meta(), chart=path_chart)


widgets.run_page("Activation patching", "patching", main)
