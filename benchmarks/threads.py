"""Torch CPU threads: time forward passes at 1 and 2 threads, alone and beside a busy process.

    python benchmarks/threads.py [--model demo] [--seconds 3]

On a 2-core machine a second busy process makes 2-thread torch stall on the shared core;
this prints the ratio so the default (CIRCUIT_EXPLORER_THREADS, 1 on <= 4 cores) can be checked.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from explorer.core import engine  # noqa: E402
from explorer.sources.models import load_model  # noqa: E402


def burn(stop):
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1000003


def per_forward(lm, ids, seconds: float) -> float:
    engine.run(lm, ids)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.run(lm, ids)
        n += 1
    return (time.perf_counter() - start) / n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    lm = load_model(args.model)
    ids = torch.randint(3, 100, (args.batch, 24))
    rows = []
    for busy in (False, True):
        stop = mp.Event()
        proc = mp.Process(target=burn, args=(stop,)) if busy else None
        if proc:
            proc.start()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rows.append((busy, threads, per_forward(lm, ids, args.seconds)))
        if proc:
            stop.set()
            proc.join()
    print(f"model {args.model}, batch {args.batch} x 24 tokens, {torch.get_num_threads()} max threads set last")
    print("| other process busy | threads | ms per forward | vs 1 thread |")
    print("|---|---|---|---|")
    for busy, threads, t in rows:
        one = next(x for b, th, x in rows if b == busy and th == 1)
        print(f"| {'yes' if busy else 'no'} | {threads} | {t * 1000:.1f} | {t / one:.2f}x |")


if __name__ == "__main__":
    main()
