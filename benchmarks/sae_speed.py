"""How fast the SAE views are once a model is loaded: the first view of a pair (latents on both runs, activations
not yet cached), the same view again (cached), a feature card from the index, latent attribution over every
latent and position (one forward and one backward pass) and the engine passes each took.

python benchmarks/sae_speed.py --model smollm2 --sae smollm2-resid_post-14 [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# A cache of its own, emptied before each repeat, so "uncached" means a forward pass; prepared models stay reachable.
_REAL_CACHE = Path(os.environ.get("CIRCUIT_EXPLORER_CACHE", Path(__file__).resolve().parent.parent / "cache"))
_OWN = Path(__import__("tempfile").mkdtemp(prefix="sae_speed_"))
if (_REAL_CACHE / "models").is_dir():
    (_OWN / "models").symlink_to((_REAL_CACHE / "models").resolve())
os.environ["CIRCUIT_EXPLORER_CACHE"] = str(_OWN)

from explorer.analyses import sae_features as sf  # noqa: E402
from explorer.core import cache  # noqa: E402
from explorer.core.prompts import PromptPair, tokenize_pair  # noqa: E402
from explorer.sources.models import load_model  # noqa: E402
from explorer.sources.sae import resolve_sae  # noqa: E402

PAIRS = {
    "smollm2": PromptPair("When Mary and John went to the store, John gave a drink to",
                          "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
    "demo": PromptPair("When Mary and John went to the store , John gave a drink to",
                       "When Mary and John went to the store , Mary gave a drink to", "Mary", "John"),
}


def timed(fn, lm) -> tuple[float, int]:
    calls = lm.forward_calls
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, lm.forward_calls - calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--sae", default="demo-resid_post-1")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    lm = load_model(args.model, device="cpu", threads=args.threads)
    sae = resolve_sae(args.sae)
    index = sf.load_feature_index(sae.folder)
    tp = tokenize_pair(lm.tokenizer, PAIRS.get(args.model, PAIRS["smollm2"]), lm.arch)
    rows = {"first view (latents, both runs, uncached)": [], "same view again (cached)": [],
            "feature card from the index": [], "latent attribution (all latents x positions)": [],
            "exact patching of the top 10 cells": []}
    passes = {}
    for _ in range(args.repeat):
        cache.clear_memory()
        shutil.rmtree(Path(os.environ["CIRCUIT_EXPLORER_CACHE"]) / "activations", ignore_errors=True)
        for key, fn in (
            ("first view (latents, both runs, uncached)",
             lambda: sf.pair_latents(lm, sae, tp).differing(tp.n_pos - 1)),
            ("same view again (cached)", lambda: sf.pair_latents(lm, sae, tp).differing(tp.n_pos - 1)),
            ("feature card from the index", lambda: sf.feature_card(lm, sae, 0, index=index)),
            ("latent attribution (all latents x positions)", lambda: sf.latent_attribution(lm, sae, tp, exact_top=0)),
            ("exact patching of the top 10 cells", lambda: sf.latent_attribution(lm, sae, tp, exact_top=10)),
        ):
            seconds, n = timed(fn, lm)
            rows[key].append(seconds)
            passes[key] = n
    print(f"{args.model} ({tp.n_pos} tokens), SAE {args.sae} (d_sae {sae.d_sae}), CPU, {args.threads} thread(s), "
          f"median of {args.repeat}; before each repeat the activation cache (memory and disk) is emptied\n")
    print("| view | median s | engine passes |")
    print("|---|---|---|")
    for key, values in rows.items():
        print(f"| {key} | {statistics.median(values):.3f} | {passes[key]} |")


if __name__ == "__main__":
    main()
