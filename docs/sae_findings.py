"""Which SAE latents carry a task's logit difference: attribution, exact latent patching and knockdown over a set.

python docs/sae_findings.py --model demo --sae demo-resid_post-1 --prompts prompts/demo_ioi.jsonl --pairs 24
prints a markdown section (the findings in docs/saes.md were made this way).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from explorer.analyses import sae_features as sf  # noqa: E402
from explorer.core.prompts import check_for_tokenizer, load_prompt_set, tokenize_pair  # noqa: E402
from explorer.sources.models import load_model  # noqa: E402
from explorer.sources.sae import resolve_sae  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--sae", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--n-random", type=int, default=10)
    args = ap.parse_args()
    started = time.time()
    lm = load_model(args.model, device="cpu", threads=1)
    sae = resolve_sae(args.sae)
    ps = check_for_tokenizer(load_prompt_set(args.prompts), lm.tokenizer)
    pairs = [tokenize_pair(lm.tokenizer, p, lm.arch) for p in ps.by_category("headline")]
    pairs = [tp for tp in pairs if tp.same_length][: args.pairs]
    per_latent, cells = [], []
    for tp in pairs:
        res = sf.latent_attribution(lm, sae, tp, exact_top=0)
        per_latent.append(res.per_latent.assign(pair=tp.pair.id))
        cells.append(res.cells.assign(pair=tp.pair.id))
    pl = pd.concat(per_latent)
    summary = (pl.groupby("latent")["estimate"].agg(["sum", "count"]).rename(columns={"count": "pairs_active"}))
    summary["mean_estimate"] = summary["sum"] / len(pairs)
    summary = summary.drop(columns="sum").sort_values("mean_estimate", key=abs, ascending=False).head(args.top)
    top = summary.index.tolist()
    where = pd.concat(cells)
    where = where[where["latent"].isin(top)]
    rows = []
    for latent in top:
        exact = pd.concat([sf.patch_latents(lm, sae, tp, [[latent]]) for tp in pairs])
        knock = sf.knockdown(lm, sae, pairs, [latent], n_random=args.n_random)
        card = sf.feature_card(lm, sae, latent, n_contexts=3)
        promoted = card.logit_effects[card.logit_effects["direction"] == "promoted"]["token"].head(4).tolist()
        strongest = (where[where["latent"] == latent].groupby("token")["estimate"].sum()
                     .sort_values(key=abs, ascending=False).head(2).index.tolist())
        tops = card.contexts[card.contexts["is_top"]]["token"].tolist()
        s = knock.summary
        rows.append({"latent": latent,
                     "attribution (mean recovery est.)": round(float(summary.loc[latent, "mean_estimate"]), 3),
                     "pairs active": int(summary.loc[latent, "pairs_active"]),
                     "exact patch recovery (mean)": round(float(exact["recovery"].mean()), 3),
                     "at tokens": " ".join(strongest),
                     "knockdown drop [95% CI]": f"{s['mean_drop']:.3f} [{s['mean_drop_ci95'][0]:.3f}, "
                                                f"{s['mean_drop_ci95'][1]:.3f}]",
                     "random latents (mean drop)": round(s["random_mean_drop"], 3),
                     "top held-out tokens": " ".join(tops), "promotes": " ".join(promoted)})
    table = pd.DataFrame(rows)
    print(f"### {Path(args.prompts).name}: {len(pairs)} pairs, SAE `{args.sae}` ({sae.cfg.hook_name})\n")
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for r in table.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in r) + " |")
    print()
    print(tracking(lm, sae, ps.by_category("headline")))
    print(f"\n({time.time() - started:.0f} s on one CPU thread; knockdown = zero ablation on the clean run at every "
          "spliced position (>= 1, no massive activations) with the error term kept, beside "
          f"{args.n_random} random latents of similar frequency.)")


def tracking(lm, sae, all_pairs, top: int = 8, min_support: int = 3) -> str:
    """Latents at the last position of the clean prompt that track the answer (IOI: the indirect object; set
    completion: the missing item) and the other name (IOI: the subject): precision and recall of 'fires' for
    the value it fires for most."""
    rows = []
    for pair in all_pairs:
        tp = tokenize_pair(lm.tokenizer, pair, lm.arch)
        z = sf._latents(sae, sf._prompt_acts(lm, sae, tp.clean_ids)[1])[-1]
        for latent in z.nonzero().flatten().tolist():
            rows.append({"latent": latent, "answer": pair.clean_answer.strip(),
                         "other": pair.corrupted_answer.strip(), "act": float(z[latent])})
    fires = pd.DataFrame(rows)
    n_by = {v: sum(1 for p in all_pairs if p.clean_answer.strip() == v) for v in fires["answer"].unique()}
    n_other = {v: sum(1 for p in all_pairs if p.corrupted_answer.strip() == v) for v in fires["other"].unique()}
    out = []
    for latent, g in fires.groupby("latent"):
        for var, counts, totals in (("answer", g["answer"].value_counts(), n_by),
                                    ("other", g["other"].value_counts(), n_other)):
            value, hits = counts.index[0], int(counts.iloc[0])
            if hits < min_support or totals[value] < min_support:
                continue  # one or two prompts prove nothing
            precision, recall = hits / len(g), hits / totals[value]
            out.append({"latent": latent, "tracks": var, "value": value, "fires on": len(g),
                        "precision": round(precision, 2), "recall": round(recall, 2),
                        "f1": round(2 * precision * recall / (precision + recall), 2)})
    if not out:
        return f"No latent at the last position fires for one value of a task variable on >= {min_support} prompts."
    table = pd.DataFrame(out).sort_values("f1", ascending=False).drop_duplicates("latent").head(top)
    lines = [f"Latents at the last position that track a task variable ({len(all_pairs)} clean prompts; "
             "'answer' = the clean answer, 'other' = the corrupted answer, e.g. the IOI subject; only values seen "
             f"on >= {min_support} prompts):", "",
             "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in table.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
