"""What every analysis result carries: the spec that produced it, and one way to serialise itself.

A spec names the analysis, the tool version, the model (id, weight hash, dtype, device), the prompt
pair or prompt set and the parameters (site, positions, direction, metric, ...). `Result.to_json()`
is what the CLI prints with --json, what page exports write and what run cards and stories embed;
`Result.meta()` is the spec plus the result's title and formula, for file metadata.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from explorer import __version__


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy and torch scalars become Python numbers, NA and NaN become None."""
    if isinstance(value, Result):
        body = value.to_json()
        body.pop("spec", None)
        return body
    if isinstance(value, pd.DataFrame):
        return records(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    return repr(value)  # sentinels such as positions.LAST


def records(frame: pd.DataFrame) -> list[dict]:
    return [{str(k): jsonable(v) for k, v in row.items()} for row in frame.to_dict("records")]


def make_spec(analysis: str, lm, tp=None, prompt_set=None, **params) -> dict:
    """The spec of one run: analysis, tool version, model, pair (or prompt set) and parameters."""
    spec = {"analysis": analysis, "tool_version": __version__, "model": lm.describe()}
    if tp is not None:
        spec["pair"] = tp.pair.to_dict()
        spec["n_tokens"] = {"clean": len(tp.clean_ids), "corrupted": len(tp.corrupted_ids)}
    if prompt_set is not None:
        spec["prompt_set"] = prompt_set
    spec["params"] = jsonable(params)
    return spec


class Result:
    """Mixin for result dataclasses that have a `spec` field (a dict from make_spec)."""

    _skip_json: tuple[str, ...] = ("spec", "pair")
    _records: str = "frame"  # the main table's field, serialised as "records"
    _json_properties: tuple[str, ...] = ()  # derived numbers worth keeping in the JSON

    def meta(self) -> dict:
        out = {"spec": getattr(self, "spec", {}) or {}}
        for name in ("title", "formula", "metric"):
            value = getattr(self, name, None)
            if isinstance(value, str):
                out[name] = value
        return out

    def to_json(self) -> dict:
        out = self.meta()
        for f in dataclasses.fields(self):
            if f.name in self._skip_json or f.name in out:
                continue
            out["records" if f.name == self._records else f.name] = jsonable(getattr(self, f.name))
        for name in self._json_properties:
            out[name] = jsonable(getattr(self, name))
        return out


INDEX_COLUMNS = ("layer", "head", "pos")


def nullable_ints(frame: pd.DataFrame, columns=INDEX_COLUMNS) -> pd.DataFrame:
    """Index columns as nullable integers: a missing layer, head or position (the embedding, a row that is
    not a head, a sum over positions, a joint patch) is <NA>, never a magic -1."""
    for col in columns:
        if col in frame:
            frame[col] = frame[col].astype("Int64")
    return frame
