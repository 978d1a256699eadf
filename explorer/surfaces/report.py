"""Per-family baseline tables for a model over bundled prompt sets (accuracy, mean logit differences).

`python -m explorer.surfaces.report --model smollm2 --prefix smollm2`
"""
from __future__ import annotations

import argparse

import pandas as pd

from explorer.analyses.dataset import pair_baselines, summarize
from explorer.core.prompts import check_for_tokenizer, load_prompt_set
from explorer.core.runtime import REPO_ROOT


def markdown_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional tabulate package)."""
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


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
    from explorer.sources.models import load_model
    lm = load_model(args.model)
    table = family_table(lm, args.prefix or args.model)
    print(markdown_table(table))


if __name__ == "__main__":
    main()
