"""Prompt sets: upload a JSONL set or pick a bundled one, filter it by category and task, and see each
pair's baselines; any pair can be copied into the editor, and an uploaded set serves every page's picker."""
import streamlit as st

from explorer.analyses.dataset import pair_baselines, summarize
from explorer.core.errors import ExplorerInputError
from explorer.core.metrics import LD_FORMULA
from explorer.core.prompts import check_for_tokenizer
from explorer.surfaces.ui import state, widgets


def main(lm, _tp) -> None:
    widgets.upload_prompt_set(st, select="prompt_sets.set")
    c1, c2, c3 = st.columns([2, 1, 1])
    name = widgets.choice(c1, "Prompt set", "set", widgets.prompt_set_choices(lm), url=False)
    try:
        loaded = widgets.load_set(name)
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()
    prompt_set = check_for_tokenizer(loaded, lm.tokenizer)
    if prompt_set.errors:
        with st.expander(f"{len(prompt_set.errors)} line(s) or pair(s) skipped"):
            st.markdown("\n".join(f"- {e}" for e in prompt_set.errors))
    categories = sorted({p.category for p in prompt_set.pairs})
    tasks = sorted({p.task for p in prompt_set.pairs})
    picked_categories = widgets.setting(c2.multiselect, "Category", "categories", categories, url=False,
                                        valid=lambda v: set(v) <= set(categories), options=categories)
    picked_tasks = widgets.setting(c3.multiselect, "Task", "tasks", tasks, url=False,
                                   valid=lambda v: set(v) <= set(tasks), options=tasks)
    pairs = [p for p in prompt_set.pairs if p.category in picked_categories and p.task in picked_tasks]
    st.caption(f"{len(pairs)} of {len(prompt_set.pairs)} pairs that fit this model · sha256 "
               f"{(loaded.sha256 or '')[:12]}")
    if not pairs:
        st.info("No pair matches these filters.")
        widgets.stop()
    limit = widgets.integer(st, "Pairs to run (the first ones after filtering)", "limit", 200, 1, 5000, url=False)
    shown = pairs[:limit]
    key = ("baselines", lm.identity, loaded.sha256, tuple(p.id for p in shown), tuple(p.clean for p in shown))
    try:
        with st.spinner(f"Running {len(shown)} pairs ..."):
            table = state.store().results.get_or_compute(key, lambda: pair_baselines(lm, shown))
    except ExplorerInputError as exc:
        state.show_error(exc)
        widgets.stop()
    table = table.assign(clean=[p.clean for p in shown], corrupted=[p.corrupted for p in shown],
                         clean_answer=[p.clean_answer for p in shown],
                         corrupted_answer=[p.corrupted_answer for p in shown])
    st.subheader("Per pair")
    st.caption(f"{LD_FORMULA}. top1_correct: the run's most likely next token is its own answer.")
    st.dataframe(table, hide_index=True, width="stretch")
    if (table["category"] == "headline").any():
        st.subheader("Per task (headline pairs)")
        st.dataframe(summarize(table), hide_index=True, width="stretch")
    widgets.export_buttons(table, f"prompt_set_{loaded.sha256[:12]}",
                           {"prompt_set": name, "sha256": loaded.sha256, "model": lm.describe()})

    st.subheader("Use one pair")
    labels = [f"{p.id} [{p.category}, {p.task}] {p.clean[:70]}" for p in shown]
    pick = st.selectbox("Pair", range(len(shown)), format_func=labels.__getitem__, key="prompt_sets.pick")
    st.button("Use this pair", on_click=state.set_pair, args=(shown[pick],),
              help="Copies the pair into the editor; every page then runs on it.")


widgets.run_page("Prompt sets", "prompt_sets", main, needs_pair=False)
