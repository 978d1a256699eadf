"""Ablation on the clean AND the corrupted run; prompt-set statistics and run cards."""
import json

import streamlit as st

from explorer.analyses.ablation import METHODS, Reference, Thresholds, ablate_pair, ablate_set, parse_targets
from explorer.core.errors import ExplorerInputError
from explorer.core.metrics import RELATIVE_DROP_FORMULA, SHIFT_FORMULA
from explorer.core.prompts import check_for_tokenizer, load_prompt_set
from explorer.surfaces.ui import charts, state, widgets

POSITION_MODES = ["all", "last", "chosen"]
THRESHOLDS = (("min_mean_drop", "Min mean drop (logits)", 1.0), ("min_relative_drop", "Min relative drop", 0.2),
              ("min_specificity", "Min specificity", 3.0), ("specificity_floor", "Specificity floor (logits)", 0.1))


def main(lm, tp) -> None:
    st.caption(f"{SHIFT_FORMULA}. On the clean run: {RELATIVE_DROP_FORMULA}.")
    c1, c2, c3 = st.columns([3, 1, 1])
    text = widgets.setting(c1.text_input, "Targets (heads L3H1 or 3.1; layers attn2, mlp2, resid2)", "targets",
                           f"L{lm.arch.n_layers // 2} attn")
    method = widgets.choice(c2, "Method", "method", METHODS)
    mode = widgets.choice(c3, "Positions", "positions", POSITION_MODES)
    positions = mode
    if mode == "chosen":
        labels = tp.position_labels()
        offered = list(range(tp.n_pos))
        picked = widgets.setting(
            st.multiselect, "Ablate at these positions (clean-run positions; the corrupted run uses the same indices)",
            "chosen", tp.differing_positions or [tp.n_pos - 1],
            parse=lambda v: [int(p) for p in v.split(",") if p.strip()],
            valid=lambda v: isinstance(v, list) and all(p in offered for p in v),
            options=offered, format_func=lambda p: labels[p])
        if not picked:
            st.info("Pick at least one position.")
            widgets.stop()
        positions = picked

    sets = widgets.bundled_prompt_sets()
    ref_set = None
    if method != "zero":
        # Default to the bundled set with the most prompts of this pair's token length (resample needs them).
        same_length = [sum(len(lm.tokenizer(p.clean)["input_ids"]) == tp.n_pos for p in load_prompt_set(s).pairs)
                       for s in sets]
        names = [p.name for p in sets]
        ref_name = widgets.choice(st, "Reference set for mean / resample", "reference", names,
                                  default=names[max(range(len(sets)), key=same_length.__getitem__)],
                                  help="Mean ablation uses the target's mean over the clean prompts of this set "
                                       "(all positions); resample draws a same-length prompt from it.")
    try:
        targets = parse_targets(text, lm.arch)
        reference = None
        if method != "zero":
            ref_set = load_prompt_set(widgets.PROMPTS_DIR / ref_name)
            reference = Reference.from_pairs(lm, ref_set.by_category("headline"))
        with st.spinner("Ablating ..."):
            res = ablate_pair(lm, tp, targets, method, positions, reference)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()

    st.subheader("This pair: each target alone and all together, on both runs")
    chart = charts.ablation_bars(res.frame, res.title)
    st.altair_chart(chart)
    st.dataframe(res.frame, hide_index=True, width="stretch")
    for line in res.sentences():
        st.markdown(line)
    widgets.export_buttons(res.frame, f"ablation_{method}", res.meta(), chart=chart)

    st.subheader("Over a prompt set")
    with st.form("set_ablation"):
        c1, c2, c3 = st.columns(3)
        set_name = widgets.choice(c1, "Prompt set", "set_name", widgets.prompt_set_choices(lm), url=False, form=True)
        n_random = widgets.integer(c2, "Random same-size target sets", "n_random", 10, 0, 100, url=False, form=True)
        n_pairs = widgets.integer(c3, "Max headline pairs", "set_pairs", 120, 5, 1000, url=False, form=True)
        c1, c2, c3, c4 = st.columns(4)
        th = Thresholds(**{name: widgets.setting(col.number_input, label, name, default, url=False, form=True,
                                                 parse=float, min_value=0.0)
                           for col, (name, label, default) in zip((c1, c2, c3, c4), THRESHOLDS)})
        widgets.unfit_sets_caption(lm)
        go = widgets.submit_button("Run on prompt set")
    if go:
        try:
            ps = check_for_tokenizer(widgets.load_set(set_name), lm.tokenizer)
            if ps.errors:
                st.warning(f"{len(ps.errors)} pair(s) skipped: " + "; ".join(ps.errors[:5]))
            pairs = ps.by_category("headline")[: int(n_pairs)] + ps.by_category("control")
            with st.status(f"Ablating {len(pairs)} pairs ...", expanded=True):
                progress = widgets.progress_callback("Prompt set")
                result = ablate_set(lm, pairs, targets, method, positions,
                                    reference_pairs=ref_set.by_category("headline") if method != "zero" else None,
                                    thresholds=th, n_random=int(n_random), progress=progress)
        except ExplorerInputError as exc:
            state.show_error(exc)
            widgets.stop()
        m = result.metrics
        colour = {"pass": "green", "pass_with_warnings": "orange", "fail": "red"}[result.status]
        st.markdown(f"### Status: :{colour}[{result.status}]")
        for w in result.warnings:
            st.warning(w)
        c = st.columns(4)
        c[0].metric("Mean drop (clean run)", f"{m['mean_drop']:.3f}", help="mean of LD_clean − LD_ablated, 95% bootstrap CI below")
        c[0].caption(f"95% CI [{m['mean_drop_ci95'][0]:.3f}, {m['mean_drop_ci95'][1]:.3f}]")
        c[1].metric("Relative drop, ratio of means", f"{m['relative_drop_ratio_of_means']:.3f}")
        c[1].caption(f"95% CI [{m['relative_drop_ratio_of_means_ci95'][0]:.3f}, {m['relative_drop_ratio_of_means_ci95'][1]:.3f}]")
        c[2].metric("Relative drop, mean of per-pair ratios", f"{m['relative_drop_mean_of_ratios']:.3f}")
        c[2].caption(f"95% CI [{m['relative_drop_mean_of_ratios_ci95'][0]:.3f}, {m['relative_drop_mean_of_ratios_ci95'][1]:.3f}]")
        c[3].metric("Specificity", f"{m['specificity']:.2f}")
        c[3].caption(f"= mean headline drop / max(mean |control drop| = {m['control_mean_abs_drop']:.3f}, floor {m['specificity_floor']})")
        st.caption(f"Corrupted run: mean shift {m['mean_shift_corrupted']:+.3f} (against the corrupted baseline). "
                   f"Random same-size targets: mean drop {m['random_mean_drop_mean']:.3f}, 95th percentile {m['random_mean_drop_p95']:.3f}.")
        hist = charts.drop_histogram(result.per_pair)
        st.altair_chart(hist, width="stretch")
        st.dataframe(result.per_pair, hide_index=True)
        widgets.export_buttons(result.per_pair, f"ablation_set_{method}", {**result.meta(), "prompt_set": set_name},
                               chart=hist)
        card = result.run_card(lm, ps.path, ps.sha256)
        st.download_button("Run card (JSON)", json.dumps(card, indent=1, default=float), file_name="run_card.json",
                           mime="application/json")


widgets.run_page("Ablation", "ablation", main)
