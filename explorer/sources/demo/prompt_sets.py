"""Write the demo prompt sets (prompts/demo_*.jsonl) from the task generators.

Headline pairs are drawn only from held-out prompts (never seen in training: both the
clean and the corrupted prompt hash into the held-out split), so the sets also serve
as the held-out evaluation data of the model card.
`python -m explorer.sources.demo.prompt_sets`
"""
from __future__ import annotations

import random

from explorer.sources.demo.tasks import GENERATORS, make_controls
from explorer.sources.demo.train import is_held_out
from explorer.core.prompts import PromptPair, write_jsonl
from explorer.core.runtime import REPO_ROOT

N_HEADLINE, N_CONTROL = 120, 12


def held_out_pairs(task: str, n: int, seed: int, max_tries: int = 2_000_000) -> list[PromptPair]:
    rng = random.Random(f"heldout:{task}:{seed}")
    out, seen = [], set()
    for _ in range(max_tries):
        pair = GENERATORS[task](rng)
        if pair.clean in seen or not (is_held_out(pair.clean) and is_held_out(pair.corrupted)):
            continue
        seen.add(pair.clean)
        out.append(PromptPair(**{**pair.to_dict(), "id": f"{task}-{len(out):03d}"}))
        if len(out) == n:
            break
    return out


def build(seed: int = 7) -> dict[str, int]:
    counts = {}
    for task in GENERATORS:
        headline = held_out_pairs(task, N_HEADLINE, seed)
        controls = make_controls(task, headline, N_CONTROL, seed)
        write_jsonl(headline + controls, REPO_ROOT / "prompts" / f"demo_{task}.jsonl")
        counts[task] = len(headline)
    return counts


if __name__ == "__main__":
    print(build())
