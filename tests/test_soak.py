"""A long session: 200 mixed requests through the app (page changes, edits, setting changes,
reruns) in one AppTest session, with no error and no growth of memory past a bound.
`python -m tests.test_soak` writes docs/soak.md with the RSS curve."""
import itertools
import os

import psutil
import pytest

from explorer.core.runtime import REPO_ROOT

REQUESTS = 200
# Growth allowed after the warm-up (every page and setting seen once): caches are bounded, so
# RSS should level off; the bound leaves room for the allocator's noise.
GROWTH_BOUND_MB = 150
PAGES = ["pages/1_Patching.py", "pages/2_Ablation.py", "pages/4_DLA.py", "pages/5_Logit_lens.py",
         "pages/6_Attention.py", "pages/7_Weights.py", "pages/3_Attribution.py", "app.py"]
EDITS = [("w.corrupted_answer", "Grape"), ("w.corrupted_answer", "Orange"), ("w.clean_answer", "Peach"),
         ("w.clean_answer", "Mango")]
SETTINGS = {"pages/1_Patching.py": ("w.patching.site", ["attn_out", "mlp_out", "resid_post"]),
            "pages/4_DLA.py": ("w.dla.run", ["corrupted", "clean"]),
            "pages/2_Ablation.py": ("w.ablation.method", ["mean", "zero"])}


def soak(requests: int = REQUESTS) -> list[tuple[int, float]]:
    """Run the requests; returns (request number, RSS in MiB) every 10 requests."""
    from tests.test_app import page
    process = psutil.Process(os.getpid())
    at = page("app.py")
    curve, pages, edits = [], itertools.cycle(PAGES), itertools.cycle(EDITS)
    settings = {name: itertools.cycle(values) for name, (_, values) in SETTINGS.items()}
    current = "app.py"
    for n in range(1, requests + 1):
        kind = n % 4
        if kind in (0, 1):
            current = next(pages)
            at.switch_page(current).run()
        elif kind == 2:
            key, value = next(edits)
            [w for w in at.text_input if w.key == key][0].set_value(value).run()
        elif current in SETTINGS:
            key, _ = SETTINGS[current]
            [w for w in itertools.chain(at.selectbox, at.radio) if w.key == key][0].set_value(
                next(settings[current])).run()
        else:
            at.run()
        assert not at.exception, (n, current, at.exception)
        assert not at.error, (n, current, [e.value for e in at.error])
        if n % 10 == 0:
            curve.append((n, process.memory_info().rss / 2**20))
    return curve


def test_two_hundred_requests_without_errors_or_memory_growth(demo_model):
    curve = soak()
    warm = dict(curve)[40]
    peak = max(rss for _, rss in curve)
    assert peak - warm < GROWTH_BOUND_MB, curve


if __name__ == "__main__":
    os.environ.setdefault("CIRCUIT_EXPLORER_THREADS", "1")
    curve = soak()
    lines = ["# Soak: 200 mixed requests in one app session", "",
             "`python -m tests.test_soak` (the test `tests/test_soak.py` asserts no error and a growth of less "
             f"than {GROWTH_BOUND_MB} MiB after request 40). Requests cycle through every page, pair edits, "
             "setting changes and reruns on the demo model; RSS of the process running the app:", "",
             "| request | RSS (MiB) | |", "|---|---|---|"]
    low = min(rss for _, rss in curve)
    for n, rss in curve:
        lines.append(f"| {n} | {rss:.0f} | {'█' * max(1, round((rss - low) / 4))} |")
    (REPO_ROOT / "docs" / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
