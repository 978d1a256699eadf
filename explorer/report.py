"""Per-family baseline tables for a model over bundled prompt sets (accuracy, mean logit differences).

`python -m explorer.report --model smollm2 --prefix smollm2`
"""
from __future__ import annotations

import argparse

import pandas as pd

from explorer.dataset import pair_baselines, summarize
from explorer.prompts import check_for_tokenizer, load_prompt_set
from explorer.runtime import REPO_ROOT


def family_table(lm, prefix: str) -> pd.DataFrame:
    frames = []
    for path in sorted((REPO_ROOT / "prompts").glob(f"{prefix}_*.jsonl")):
        ps = check_for_tokenizer(load_prompt_set(path), lm.tokenizer)
        frames.append(pair_baselines(lm, ps.pairs))
    return summarize(pd.concat(frames, ignore_index=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prefix", default=None)
    args = parser.parse_args(argv)
    from explorer.models import load_model
    lm = load_model(args.model)
    table = family_table(lm, args.prefix or args.model)
    print(table.to_markdown(index=False, floatfmt=".3f") if hasattr(table, "to_markdown") else table.to_string())


if __name__ == "__main__":
    main()
