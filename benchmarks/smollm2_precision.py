"""SmolLM2-135M on the CPU in float32 and bfloat16: resident memory and speed of the app's work.

Each dtype runs in its own fresh process (peak RSS is the kernel's high-water mark, VmHWM, so it
cannot be missed between samples): load, the baseline, a residual patching sweep (each layer x
position), a head sweep (every head, all positions), DLA and the attention grid, each timed, plus
the answers' logit differences against float32.

    python -m explorer models prepare smollm2      # once
    python benchmarks/smollm2_precision.py --threads 1 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def status() -> dict[str, float]:
    """This process's memory figures from /proc/self/status, in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    s = status()
    return s["VmRSS"], s["VmHWM"]


def measure(dtype: str, repeat: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401  (counted in the baseline RSS, as in the app)

    from explorer.analyses.attention import attention_grid
    from explorer.analyses.baseline import baseline
    from explorer.analyses.dla import dla
    from explorer.analyses.patching import head_sweep, patch_sweep
    from explorer.core import cache
    from explorer.core.prompts import tokenize_pair
    from explorer.core.runtime import cache_dir
    from explorer.sources.models import load_model
    from explorer.surfaces.ui.state import SMOLLM2_PAIR

    out = {"dtype": dtype, "rss_before_load_mb": rss_mb()[0]}
    started = time.perf_counter()
    lm = load_model("smollm2", device="cpu", dtype=dtype)
    out["load_s"] = time.perf_counter() - started
    out["rss_after_load_mb"] = rss_mb()[0]
    tp = tokenize_pair(lm.tokenizer, SMOLLM2_PAIR)
    steps = {"baseline": lambda: baseline(lm, tp),
             "resid sweep": lambda: patch_sweep(lm, tp, "resid_post", "each", "denoise"),
             "head sweep": lambda: head_sweep(lm, tp, "all", "denoise"),
             "dla": lambda: dla(lm, tp, "clean"),
             "attention grid": lambda: attention_grid(lm, tp, [(0, 0), (15, 3), (29, 8)], "clean")}
    results = {}
    for name, step in steps.items():
        times = []
        for _ in range(repeat):
            cache.clear_memory()   # each repeat computes: no hit in memory or on disk
            for folder in ("activations", "results"):
                shutil.rmtree(cache_dir() / folder, ignore_errors=True)
            t = time.perf_counter()
            results[name] = step()
            times.append(time.perf_counter() - t)
        out[f"{name}_s"] = min(times)
    out["ld_clean"], out["ld_corrupted"] = results["baseline"].ld_clean, results["baseline"].ld_corrupted
    out["resid_recovery"] = results["resid sweep"].frame["recovery"].tolist()
    out["rss_end_mb"], out["peak_rss_mb"] = rss_mb()
    # float32 weights stay pages of the mapped safetensors file (file-backed, clean, shared); weights
    # converted on load (bfloat16 from the float32 file) are private (anonymous) memory.
    out["anon_end_mb"], out["file_end_mb"] = status()["RssAnon"], status()["RssFile"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)   # the child process: measure one dtype, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeat)))
        return
    import tempfile
    rows = []
    for dtype in args.dtypes.split(","):
        env = {**os.environ, "CIRCUIT_EXPLORER_THREADS": str(args.threads),
               # a fresh, empty result cache: every step computes, as on a new Cloud container
               "CIRCUIT_EXPLORER_CACHE": tempfile.mkdtemp(prefix="ce-precision-")}
        models = ROOT / "cache" / "models"
        if models.is_dir():   # the prepared SmolLM2 copy is read from the real cache
            os.symlink(models, Path(env["CIRCUIT_EXPLORER_CACHE"]) / "models")
        done = subprocess.run([sys.executable, __file__, "--one", dtype, "--repeat", str(args.repeat)],
                              env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ref = rows[0]
    keys = ["load_s", "baseline_s", "resid sweep_s", "head sweep_s", "dla_s", "attention grid_s"]
    print("| dtype | RSS after load (MiB) | peak RSS (MiB) | RSS at the end: private / file-backed (MiB) | "
          + " | ".join(k[:-2] + " (s)" for k in keys) + " | LD clean / corr | max |recovery − float32's| |")
    print("|---" * (len(keys) + 6) + "|")
    for r in rows:
        diff = max(abs(a - b) for a, b in zip(r["resid_recovery"], ref["resid_recovery"]))
        print(f"| {r['dtype']} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['anon_end_mb']:.0f} / {r['file_end_mb']:.0f} | "
              + " | ".join(f"{r[k]:.2f}" for k in keys)
              + f" | {r['ld_clean']:+.2f} / {r['ld_corrupted']:+.2f} | {diff:.3f} |")


if __name__ == "__main__":
    main()
