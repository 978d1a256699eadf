"""Which positions an experiment touches: one vocabulary for every analysis, the CLI and the URL.

    "each"   every position on its own, one experiment per position (both prompts the same length)
    "last"   the last position of each run (the only choice when the prompts' lengths differ)
    "all"    every position at once, in one experiment
    [i, ...] chosen positions, at once

`parse` reads the vocabulary from text ("each", "last", "all", "3,5"); `cells` turns it into the
positions of single-cell experiments; `indices` into the positions one write covers. A position is
an int, None (all positions) or LAST (each run's last position): never -1.
"""
from __future__ import annotations

from explorer.core.errors import ExplorerInputError

MODES = ("each", "last", "all")


class _Last:
    """Each run's last position, whatever its length (a sentinel that no index arithmetic can take for -1)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LAST"

    def __reduce__(self):
        return "LAST"


LAST = _Last()


def parse(text, allowed: tuple[str, ...] = MODES, lists: bool = True, name: str = "Positions"):
    """'each' | 'last' | 'all' | 'i,j,...' -> the mode, or a list of ints; one message for anything else."""
    if isinstance(text, (list, tuple)):
        return [int(p) for p in text]
    text = str(text).strip()
    if text in allowed:
        return text
    if lists:
        try:
            return [int(p) for p in text.split(",")]
        except ValueError:
            pass
    names = ", ".join(allowed) + (" or comma-separated positions" if lists else "")
    raise ExplorerInputError(f"{name} must be {names}, not {text!r}.")


def check_range(positions: list[int], n_pos: int) -> list[int]:
    for p in positions:
        if not 0 <= p < n_pos:
            raise ExplorerInputError(f"Position {p} is out of range: the prompts have positions 0..{n_pos - 1}.")
    return positions


def cells(spec, tp, what: str = "Patching") -> list:
    """Positions of single-cell experiments: each -> 0..n-1, last -> [LAST], all -> [None], a list -> itself."""
    spec = parse(spec)
    if spec == "last":
        return [LAST]
    if isinstance(spec, list):
        tp.require_same_length(f"{what} at chosen positions")
        return check_range(spec, tp.n_pos)
    tp.require_same_length(f"{what} at {'each position' if spec == 'each' else 'all positions'}")
    return list(range(tp.n_pos)) if spec == "each" else [None]


def indices(spec, n_pos: int) -> list[int] | None:
    """Positions one write covers in a run of n_pos tokens: None (all), [n_pos - 1] (last) or the list."""
    spec = parse("all" if spec is None else spec, allowed=("last", "all"))
    if spec == "all":
        return None
    if spec == "last":
        return [n_pos - 1]
    return check_range(spec, n_pos)


def describe(spec) -> str:
    spec = parse(spec)
    if isinstance(spec, list):
        return "position" + ("s " if len(spec) > 1 else " ") + ", ".join(map(str, spec))
    return {"each": "each position", "last": "last position only", "all": "all positions at once"}[spec]
