"""Files a view can be saved as: PNG, SVG and standalone HTML of its chart, CSV and JSON of its data.

Each file carries the run's spec (model id and weight hash, prompts, site, positions, direction,
metric): PNG in an iTXt chunk, SVG in <metadata>, HTML in a JSON script block, JSON in a "spec"
field; CSV has no place for it, so it gets a `.spec.json` sidecar. Charts are rendered offline by
vl-convert (Vega's own renderer, bundled in the wheel). No streamlit here: the CLI uses it too.
"""
from __future__ import annotations

import json
import struct
import zlib
from xml.sax.saxutils import escape

import altair as alt
import pandas as pd

from explorer.core.prompts import PromptPair

METADATA_KEY = "circuit-explorer"  # PNG iTXt keyword, SVG <metadata> id, HTML script id
PNG_SCALE = 2
SPEC_FIELDS = ("site", "positions", "direction", "metric")


def run_spec(model: dict | None, pair: PromptPair | None = None, page: str | None = None,
             settings: dict | None = None, **fields) -> dict:
    """What produced a view: the model (`LoadedModel.describe()`), the prompt pair, the page and
    its settings, plus named fields (site, positions, direction, metric, title, ...). The result's own
    spec (`result.spec`, from explorer.core.results; passed as `analysis=` or, from `result.meta()`,
    as `spec=`) is kept whole under "analysis", and its parameters fill the four fields not given."""
    analysis = fields.pop("analysis", None) or fields.pop("spec", None)
    analysis = analysis if isinstance(analysis, dict) else None
    params = (analysis or {}).get("params") or {}
    model = model or (analysis or {}).get("model")
    spec: dict = {"tool": "Circuit Explorer"}
    if model:
        spec["model"] = {k: model[k] for k in ("model_id", "weight_hash", "family", "dtype", "device") if k in model}
    if pair is not None:
        spec["prompts"] = {k: getattr(pair, k) for k in ("clean", "corrupted", "clean_answer", "corrupted_answer")}
    if page:
        spec["page"] = page
    if settings:
        spec["settings"] = {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, list))}
    for name in SPEC_FIELDS:   # the four that every chart title states: given, else the result's, else the page's
        value = fields.pop(name, None) or params.get(name) or (settings or {}).get(name)
        if value is not None:
            spec[name] = value
    spec.update({k: v for k, v in fields.items() if v is not None})
    if analysis:
        spec["analysis"] = analysis
    return _plain(spec)


def _plain(value):
    """JSON-safe copy (numpy scalars, tuples)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def chart_dict(chart: alt.TopLevelMixin) -> dict:
    """The chart's Vega-Lite spec with its data inline (no row limit: an export holds every row)."""
    with alt.data_transformers.enable("default", max_rows=None):
        return chart.to_dict()


def _payload(chart_spec: dict, spec: dict) -> str:
    return json.dumps({"spec": spec, "vega_lite": chart_spec}, ensure_ascii=False)


# ---- PNG: the picture at 2x, the spec and chart in an iTXt chunk (read back by png_metadata) ----
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def chart_png(chart: alt.TopLevelMixin, spec: dict, scale: int = PNG_SCALE) -> bytes:
    import vl_convert as vlc
    vl = chart_dict(chart)
    png = vlc.vegalite_to_png(vl, scale=scale)
    # iTXt: keyword, NUL, compressed flag 1, method 0 (zlib), empty language and translated keyword.
    text = zlib.compress(_payload(vl, spec).encode("utf-8"))
    chunk = _png_chunk(b"iTXt", METADATA_KEY.encode("latin-1") + b"\x00\x01\x00\x00\x00" + text)
    ihdr_end = 8 + 4 + 4 + 13 + 4   # signature, then IHDR (always first, 13 data bytes)
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def png_metadata(png: bytes) -> dict:
    """The payload `chart_png` embedded: {"spec": ..., "vega_lite": ...}."""
    if not png.startswith(PNG_MAGIC):
        raise ValueError("not a PNG file")
    pos = 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        if kind == b"iTXt" and data.startswith(METADATA_KEY.encode("latin-1") + b"\x00"):
            body = data[len(METADATA_KEY) + 1:]
            compressed, text = body[0], body[2:].split(b"\x00", 2)[2]
            return json.loads(zlib.decompress(text) if compressed else text)
        pos += 12 + length
    raise ValueError("no Circuit Explorer metadata in this PNG")


# ---- SVG and HTML ----
def chart_svg(chart: alt.TopLevelMixin, spec: dict) -> str:
    import vl_convert as vlc
    vl = chart_dict(chart)
    svg = vlc.vegalite_to_svg(vl)
    start = svg.index("<svg")
    head_end = svg.index(">", start) + 1
    metadata = f'<metadata id="{METADATA_KEY}">{escape(_payload(vl, spec))}</metadata>'
    return svg[:head_end] + metadata + svg[head_end:]


def script_json(value) -> str:
    """JSON that is safe inside an HTML <script> element (no '</script>' can close it early)."""
    return json.dumps(value, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def chart_html(chart: alt.TopLevelMixin, spec: dict) -> str:
    """One HTML file that draws the chart with no network: Vega, Vega-Lite and vega-embed inline."""
    import vl_convert as vlc
    vl = chart_dict(chart)
    page = vlc.vegalite_to_html(vl, bundle=True)
    block = f'<script type="application/json" id="{METADATA_KEY}">{script_json({"spec": spec})}</script>\n'
    caption = f'<p style="font:12px sans-serif;color:#555">{escape(spec_line(spec))}</p>\n'
    page = page.replace("</head>", block + "</head>", 1)
    return page.replace("</body>", caption + "</body>", 1)


def spec_line(spec: dict) -> str:
    """The spec in one human line, for captions."""
    model = spec.get("model", {})
    parts = [f"model {model.get('model_id', '?')} (weights {str(model.get('weight_hash', ''))[:12]})"]
    parts += [f"{k} {spec[k]}" for k in SPEC_FIELDS if k in spec]
    prompts = spec.get("prompts")
    if prompts:
        parts.append(f"clean {prompts['clean']!r} → {prompts['clean_answer']!r}; corrupted {prompts['corrupted']!r} "
                     f"→ {prompts['corrupted_answer']!r}")
    return " · ".join(parts)


# ---- data ----
def frame_csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


def frame_json(frame: pd.DataFrame, spec: dict, meta: dict | None = None) -> str:
    records = json.loads(frame.to_json(orient="records"))
    return json.dumps({"spec": spec, "meta": _plain(meta or {}), "records": records}, indent=1, ensure_ascii=False)


def spec_json(spec: dict) -> str:
    return json.dumps(spec, indent=1, ensure_ascii=False)


def all_files(name: str, frame: pd.DataFrame, spec: dict, chart=None, meta: dict | None = None) -> dict[str, bytes]:
    """Every export of one view, by file name (what the CLI and tests write at once)."""
    files = {f"{name}.csv": frame_csv(frame).encode(), f"{name}.spec.json": spec_json(spec).encode(),
             f"{name}.json": frame_json(frame, spec, meta).encode()}
    if chart is not None:
        files[f"{name}.png"] = chart_png(chart, spec)
        files[f"{name}.svg"] = chart_svg(chart, spec).encode()
        files[f"{name}.html"] = chart_html(chart, spec).encode()
    return files

