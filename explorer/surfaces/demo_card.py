"""Write the demo model's card (README.md + card.json) from measurements on the shipped folder.

`python -m explorer.surfaces.demo_card` — the test suite recomputes card.json from the shipped
weights and checks the numbers match.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from explorer.analyses.dataset import pair_baselines, summarize
from explorer.sources.models import DEMO_MODEL_DIR, load_model
from explorer.analyses.patching import patch_sweep
from explorer.core.prompts import load_prompt_set, tokenize_pair
from explorer.core.runtime import REPO_ROOT

PATCH_PAIRS = 16


def prompt_sets() -> dict:
    return {p.stem.removeprefix("demo_"): load_prompt_set(p) for p in sorted((REPO_ROOT / "prompts").glob("demo_*.jsonl"))}


def residual_table(lm, pairs) -> pd.DataFrame:
    """Mean recovery of resid_pre patching per layer: at the differing positions, the last
    position, and the best other position. Shows where the answer information sits."""
    rows = []
    for pair in pairs[:PATCH_PAIRS]:
        tp = tokenize_pair(lm.tokenizer, pair)
        f = patch_sweep(lm, tp, "resid_pre", "each").frame
        last = tp.n_pos - 1
        for layer, d in f.groupby("layer"):
            other = d[(~d["differs"]) & (d["pos"] != last)]
            rows.append({"layer": layer, "differing_pos": d.loc[d["differs"], "recovery"].mean(),
                         "last_pos": d.loc[d["pos"] == last, "recovery"].iloc[0],
                         "best_other_pos": other["recovery"].max() if len(other) else np.nan})
    return pd.DataFrame(rows).groupby("layer").mean().reset_index()


def measure(lm) -> dict:
    card = {"weights_sha256": lm.weight_hash, "families": {}}
    for task, ps in prompt_sets().items():
        frame = pair_baselines(lm, ps.pairs)
        summary = summarize(frame).iloc[0].to_dict()
        head = frame[frame["category"] == "headline"]
        quant = {f"q{int(q * 100):02d}": float(head["ld_clean"].quantile(q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)}
        card["families"][task] = {
            "pairs": int(summary["pairs"]), "accuracy": float(summary["accuracy"]),
            "mean_ld_clean": float(summary["mean_ld_clean"]), "mean_ld_corrupted": float(summary["mean_ld_corrupted"]),
            "ld_clean_quantiles": quant,
            "residual_patching": residual_table(lm, ps.by_category("headline")).round(4).to_dict("records"),
        }
    return card


def render(card: dict, training: dict, config: dict) -> str:
    lines = [
        "# Circuit Explorer demo model", "",
        "A small transformer trained from scratch, on CPU, by `python -m explorer.sources.demo.train`, on four synthetic",
        "task families with known answers. It ships with the app so everything works offline.", "",
        "## Architecture", "",
        f"Qwen2 architecture (RMSNorm, rotary position embeddings, grouped-query attention): "
        f"{config['num_hidden_layers']} layers, d_model {config['hidden_size']}, {config['num_attention_heads']} query heads "
        f"sharing {config['num_key_value_heads']} key/value heads, MLP {config['intermediate_size']}, "
        f"vocabulary {config['vocab_size']} words (word-level tokenizer, `<bos>` prepended).", "",
        "## Training data", "",
        "Generated on the fly by `explorer/sources/demo/tasks.py` (seeded, deterministic), task mix "
        + ", ".join(f"{k} {v:.0%}" for k, v in training["task_weights"].items()) + ".",
        "Loss: cross-entropy on the answer token of each clean and corrupted prompt.",
        f"Held-out rule: {training['held_out_rule']}; the bundled prompt sets contain only held-out prompts.",
        f"{training['steps']} steps of batch {training['batch']}, AdamW, peak lr {training['lr']}, warmup + cosine, "
        f"1 CPU thread, {training['train_seconds']:.0f} s. Weights sha256 `{card['weights_sha256']}`.", "",
        "- **set_completion**: a declared set of 3-4 fruits, all but one counted; the missing one is the answer. "
        "Corrupted: one counted item swapped for the missing one.",
        "- **ioi**: indirect object identification, three templates, ABBA and BABA orders. Corrupted: the second "
        "mention of the subject replaced by the indirect object.",
        "- **factual_recall**: an invented world of 20 countries with capitals, languages and animals; 60% of "
        "prompts start with a distractor fact about another country. Corrupted: another country.",
        "- **induction**: a sequence of syllables repeated after `again :`; the answer is the next syllable. "
        "Corrupted: that syllable replaced in the first occurrence.", "",
        "## Held-out accuracy and logit differences", "",
        "Accuracy: top-1 next token equals the answer, over the clean and the corrupted prompt of every headline "
        "pair. LD = logit[clean_answer] − logit[corrupted_answer] at the last position.", "",
        "| family | pairs | accuracy | mean LD clean | mean LD corrupted | LD clean 5% / 50% / 95% |",
        "|---|---|---|---|---|---|",
    ]
    for task, f in card["families"].items():
        q = f["ld_clean_quantiles"]
        lines.append(f"| {task} | {f['pairs']} | {f['accuracy']:.1%} | {f['mean_ld_clean']:+.2f} | "
                     f"{f['mean_ld_corrupted']:+.2f} | {q['q05']:.1f} / {q['q50']:.1f} / {q['q95']:.1f} |")
    lines += ["", "## Where the answer information moves (residual patching)", "",
              f"Denoising patches of resid_pre (clean → corrupted run), mean recovery over {PATCH_PAIRS} headline pairs "
              "per family: at the positions where the prompts differ, at the last position, and at the best other "
              "position.", ""]
    for task, f in card["families"].items():
        lines += [f"**{task}**", "", "| layer | differing positions | last position | best other position |",
                  "|---|---|---|---|"]
        for r in f["residual_patching"]:
            lines.append(f"| {r['layer']} | {r['differing_pos']:.3f} | {r['last_pos']:.3f} | {r['best_other_pos']:.3f} |")
        lines.append("")
    lines += ["Reproduce: `python -m explorer.surfaces.demo_card` (rewrites this file and card.json; "
              "`tests/test_demo.py` checks card.json against the shipped weights)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    lm = load_model("demo")
    card = measure(lm)
    training = json.loads((DEMO_MODEL_DIR / "training.json").read_text())
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    (DEMO_MODEL_DIR / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (DEMO_MODEL_DIR / "README.md").write_text(render(card, training, config))
    print((DEMO_MODEL_DIR / "README.md").read_text())


if __name__ == "__main__":
    main()
