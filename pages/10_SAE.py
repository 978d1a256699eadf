"""SAE features: per-token latents on the pair, attribution to LD beside exact latent patching, feature
cards, knockdown over a prompt set, steering and reconstruction health. The SAE's error term is kept
whenever latents are changed, so with no latent changed the model's output is the model's own."""
import html
from pathlib import Path

import streamlit as st

from explorer.analyses import sae_features as sf
from explorer.core.errors import ExplorerInputError
from explorer.core.positions import parse as parse_positions
from explorer.sources import sae as saes
from explorer.surfaces.ui import charts, state, widgets

LOCAL = "A local SAELens folder …"
VIEWS = ["Latents", "Attribution", "Feature card", "Knockdown", "Steering", "Health"]


@st.cache_resource(max_entries=8, show_spinner="Loading the SAE …")
def _load(folder: str, stamp: float):
    """An SAE folder read once per process (keyed by its path and the weights' modification time)."""
    sae = saes.load_sae(folder)
    return sae, sf.load_feature_index(folder)


def sae_sidebar(lm):
    """The SAE picker: the shipped SAEs made for this model first, then a local folder."""
    shipped = saes.shipped_saes()
    mine = [s for s in shipped if s["model_name"] in (lm.model_id, Path(lm.model_id).name)]
    others = [s for s in shipped if s not in mine]
    names = [s["name"] for s in mine + others] + [LOCAL]
    box = st.sidebar.expander("Sparse autoencoder", expanded=True)
    name = widgets.choice(box, "SAE", "sae", names, default=names[0],
                          help="SAEs that ship with the app (the ones made for this model first), or any folder in "
                               "SAELens' format (cfg.json + sae_weights.safetensors).")
    if name == LOCAL:
        folder = widgets.setting(box.text_input, "SAELens folder", "folder", "",
                                 placeholder="/path/to/an/sae/folder")
        if not folder:
            st.info("Give the path of a SAELens folder in the sidebar, or pick a shipped SAE.")
            widgets.stop()
    else:
        folder = next(s["folder"] for s in shipped if s["name"] == name)
    path = Path(folder).expanduser()
    weights = path / saes.WEIGHTS_FILE
    try:
        sae, index = _load(str(path), weights.stat().st_mtime if weights.is_file() else 0.0)
        warnings = saes.check_fits(sae, lm)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()
    site, layer = sae.cfg.site
    box.caption(f"{sae.cfg.architecture} SAE at **{site}** layer **{layer}**: d_in {sae.cfg.d_in}, "
                f"{sae.d_sae} latents" + (f", k = {sae.cfg.k}" if sae.cfg.k else "") +
                ("" if index is not None else " · no feature index beside it (cards show logit effects only)"))
    for w in warnings:
        st.warning(w)
    return sae, index


def main(lm, tp) -> None:
    sae, index = sae_sidebar(lm)
    view = widgets.choice(st, "View", "view", VIEWS, widget=st.radio, horizontal=True)
    try:
        {"Latents": latents_view, "Attribution": attribution_view, "Feature card": card_view,
         "Knockdown": knockdown_view, "Steering": steering_view, "Health": health_view}[view](lm, tp, sae, index)
    except ExplorerInputError as exc:
        state.show_error(exc)


def latents_view(lm, tp, sae, index) -> None:
    res = sf.pair_latents(lm, sae, tp, top_n=5)
    st.caption("Latent activations at every position of both prompts (position 0, the first token, is left out: "
               "its activations are outliers SAEs are not trained on).")
    top = res.top
    strongest = (top.groupby("latent")["activation"].max().sort_values(ascending=False).index[:16].tolist()
                 if len(top) else [])
    if not strongest:
        st.info("No latent fires on these prompts.")
        return
    run = widgets.choice(st, "Run", "run", ["clean", "corrupted"], widget=st.radio, horizontal=True)
    cells = res.heatmap(strongest, run)
    tokens = list(tp.clean_tokens if run == "clean" else tp.corrupted_tokens)
    labels = [f"{p}: {t}" for p, t in enumerate(tokens)]
    chart = charts.heatmap(cells, "pos", "latent", "activation",
                           f"SAE latents at {sae.cfg.hook_name}, {run} run: the 16 strongest latents of the pair",
                           x_labels=labels, select=False)
    st.altair_chart(chart)
    widgets.export_buttons(cells, f"sae_latents_{run}", {**res.meta(), "title": "SAE latents per token",
                                                         "metric": "activation"}, chart=chart)
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Top latents per position**")
        st.dataframe(top[top["run"] == run].drop(columns="run"), hide_index=True, height=320)
    with c2:
        if tp.same_length:
            default = tp.differing_positions[-1] if tp.differing_positions else tp.n_pos - 1
            pos = widgets.integer(st, "Position to compare the runs at", "pos", default, 1, tp.n_pos - 1)
            st.markdown(f"**Latents that differ most between the runs at position {pos}** ({labels[pos]})")
            st.dataframe(res.differing(pos), hide_index=True)
        else:
            st.info("The prompts differ in token length, so positions do not line up for a comparison.")


def attribution_view(lm, tp, sae, index) -> None:
    top_n = widgets.integer(st, "Cells patched exactly", "exact_top", 10, 1, 50)
    with st.spinner("One forward and one backward pass, then exact patches …"):
        res = sf.latent_attribution(lm, sae, tp, exact_top=top_n)
    st.caption(f"{res.formula}. Exact: the clean latent value patched into the corrupted run, the error term kept; "
               f"{res.recovery_formula}. LD_clean = {res.ld_clean:+.3f}, LD_corr = {res.ld_corrupted:+.3f}.")
    exact = res.exact
    if len(exact):
        chart = charts.estimate_vs_exact(exact, "estimate", "exact",
                                         "Latent attribution: first-order estimate vs exact latent patching")
        st.altair_chart(chart)
        st.dataframe(exact, hide_index=True)
        widgets.export_buttons(exact, "sae_attribution_exact", {**res.meta(), "title": "Latent attribution vs exact"},
                               chart=chart)
    st.markdown("**Per latent, summed over positions** (click a latent number into the feature card view)")
    st.dataframe(res.per_latent.head(30), hide_index=True)


def _contexts_html(contexts) -> str:
    """Each top context as a line of tokens shaded by the latent's activation; the firing token outlined."""
    lines = []
    peak = float(contexts["activation"].max()) if len(contexts) else 1.0
    for _, ctx in contexts.groupby("context", sort=True):
        spans = []
        for r in ctx.itertuples():
            alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, r.activation / peak))
            style = f"background: rgba(255, 140, 0, {alpha:.2f}); padding: 0 1px;"
            if r.is_top:
                style += " outline: 2px solid #c0392b; font-weight: 600;"
            spans.append(f'<span title="{r.activation:.3f}" style="{style}">{html.escape(str(r.token))}</span>')
        top = float(ctx.loc[ctx["is_top"], "activation"].max()) if ctx["is_top"].any() else float("nan")
        lines.append(f'<div style="font-family: monospace; white-space: pre-wrap; margin: 2px 0;">'
                     f'<span style="color: #888;">{top:6.2f} </span>{"".join(spans)}</div>')
    return "".join(lines)


def card_view(lm, tp, sae, index) -> None:
    default = 0
    latent = widgets.integer(st, "Latent", "latent", default, 0, sae.d_sae - 1)
    set_name = widgets.choice(st, "Prompt set (where the latent fires)", "card_set",
                              ["(none)"] + widgets.prompt_set_choices(lm), url=False)
    pairs = None
    if set_name != "(none)":
        pairs = widgets.load_set(set_name).by_category("headline")[:40]
    card = sf.feature_card(lm, sae, latent, index, n_contexts=10, pairs=pairs)
    c1, c2 = st.columns([2, 1])
    freq = "unknown (no index or sparsity file)" if card.frequency is None else f"{card.frequency:.3%} of tokens"
    c1.markdown(f"**Latent {latent}** · firing frequency on held-out text: {freq}")
    if len(card.contexts):
        c1.markdown(_contexts_html(card.contexts), unsafe_allow_html=True)
    else:
        c1.info("No feature index beside this SAE, or the latent never fired on the held-out text.")
    if len(card.histogram) and card.histogram["count"].sum():
        c2.altair_chart(charts.activation_histogram(card.histogram, f"Latent {latent}: activations when firing"))
    effects = card.logit_effects
    c2.markdown("**Logit effects** (decoder direction through the final norm and unembedding)")
    c2.dataframe(effects.pivot(index="rank", columns="direction", values="token"), hide_index=True)
    if pairs is not None:
        st.markdown(f"**Pairs of {set_name} where latent {latent} fires** ({len(card.pairs)} run(s))")
        st.dataframe(card.pairs, hide_index=True)
    widgets.export_buttons(card.contexts, f"sae_card_{latent}", {**card.meta(), "title": f"Feature card, latent {latent}"})


def _latent_list(text: str, sae) -> list[int]:
    try:
        latents = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ExplorerInputError(f"Latents must be comma-separated integers, not {text!r}.") from None
    return [sae.check_latent(i) for i in latents]


def knockdown_view(lm, tp, sae, index) -> None:
    st.caption("Ablate latents at every position of each pair's clean prompt, the error term kept; the drop in LD "
               "is compared with sets of random latents of similar firing frequency.")
    with st.form("knockdown"):
        c1, c2, c3, c4 = st.columns(4)
        text = widgets.setting(c1.text_input, "Latents (comma-separated)", "latents", "0", form=True)
        method = widgets.choice(c2, "Method", "method", ["zero", "mean"], form=True)
        set_name = widgets.choice(c3, "Prompt set", "set_name", widgets.prompt_set_choices(lm), url=False, form=True)
        n_pairs = widgets.integer(c4, "Headline pairs", "set_pairs", 24, 2, 500, url=False, form=True)
        go = widgets.submit_button("Knock down")
    if not go:
        return
    latents = _latent_list(text, sae)
    pairs = widgets.load_set(set_name).by_category("headline")[: int(n_pairs)]
    with st.spinner(f"Knocking down {len(latents)} latent(s) over {len(pairs)} pairs …"):
        res = sf.knockdown(lm, sae, pairs, latents, method, n_random=20)
    s = res.summary
    c = st.columns(3)
    c[0].metric("Pairs where it fires", f"{s['pairs_active']} / {s['pairs']}")
    c[1].metric("Mean drop in LD", f"{s['mean_drop']:+.4f}")
    c[1].caption(f"95% bootstrap CI [{s['mean_drop_ci95'][0]:+.4f}, {s['mean_drop_ci95'][1]:+.4f}]")
    if s["random_mean_drop"] is not None:
        lo, hi = s["random_mean_drop_range95"]
        c[2].metric("Random latents, mean drop", f"{s['random_mean_drop']:+.4f}")
        c[2].caption(f"95% of random sets in [{lo:+.4f}, {hi:+.4f}]; chosen by {s['random_chosen_by']}")
    st.caption(res.formula)
    chart = charts.knockdown_strip(res.per_pair, res.random, f"Knockdown of latents {text} ({method}) over {set_name}")
    st.altair_chart(chart)
    st.dataframe(res.per_pair, hide_index=True)
    widgets.export_buttons(res.per_pair, f"sae_knockdown_{method}", {**res.meta(), "title": "SAE knockdown", "summary": s}, chart=chart)


def steering_view(lm, tp, sae, index) -> None:
    with st.form("steering"):
        c1, c2, c3, c4 = st.columns(4)
        latent = widgets.integer(c1, "Latent", "steer_latent", 0, 0, sae.d_sae - 1, form=True)
        alpha = widgets.setting(c2.number_input, "alpha (× decoder direction)", "alpha", 4.0, parse=float,
                                form=True, step=1.0)
        run = widgets.choice(c3, "Prompt", "steer_run", ["clean", "corrupted"], form=True)
        where = widgets.setting(c4.text_input, "Positions (all, or comma-separated)", "steer_positions", "all",
                                form=True)
        go = widgets.submit_button("Steer")
    if not go:
        return
    positions = parse_positions(where, allowed=("all",), name="Steering positions")
    with st.spinner("Steering …"):
        res = sf.steer(lm, sae, tp, latent, float(alpha), positions, run)
    c = st.columns(3)
    c[0].metric("LD without", f"{res.ld:+.3f}")
    c[1].metric("LD steered", f"{res.ld_steered:+.3f}", delta=f"{res.ld_change:+.3f}")
    c[2].metric("alpha", f"{res.alpha:g}")
    st.markdown(f"**Greedy continuation without:** {html.escape(res.continuation)}")
    st.markdown(f"**With latent {latent} × {res.alpha:g}:** {html.escape(res.continuation_steered)}")
    st.dataframe(res.top.pivot(index="rank", columns="steered", values="token"), hide_index=True)


def health_view(lm, tp, sae, index) -> None:
    res = sf.reconstruction_health(lm, sae, tp, index)
    c = st.columns(4)
    for i, run in enumerate(("clean", "corrupted")):
        c[2 * i].metric(f"FVU, {run} run", f"{res.fvu[run]:.3f}")
        c[2 * i + 1].metric(f"LD {run}: model → reconstruction", f"{res.ld_reconstructed[run]:+.3f}",
                            delta=f"{res.ld_reconstructed[run] - res.ld[run]:+.3f} from {res.ld[run]:+.3f}",
                            delta_color="off")
    st.caption(f"FVU = ‖x − x̂‖² / ‖x − mean‖² (mean from {res.mean_from}). The LD columns splice the SAE's "
               "reconstruction in place of the activation (no error term) at every position ≥ 1.")
    chart = charts.line(res.per_position, "pos", "fvu", "run", "Fraction of variance unexplained per position")
    st.altair_chart(chart, width="stretch")
    st.dataframe(res.per_position, hide_index=True)
    widgets.export_buttons(res.per_position, "sae_health", {**res.meta(), "title": "SAE reconstruction health"},
                           chart=chart)


widgets.run_page("SAE features", "sae", main)
