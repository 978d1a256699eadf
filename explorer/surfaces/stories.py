"""Stories for talks: a small JSON or TOML file with a title and steps, each step a view (page,
model, pair or prompt set, settings as the URL writes them) with a title and a sentence or two of
narration. Load (validated: one ExplorerInputError per bad file, listing its problems), save, append
a step, and export one self-contained HTML file that plays the story with no network and no server.

File format (JSON shown; TOML has the same keys, steps as [[steps]] tables):
    {"title": "...", "description": "...",            # description optional
     "model": "demo", "pair": {...} | "prompt_set": "demo_ioi.jsonl", "pair_id": "...",  # step defaults
     "steps": [{"title": "...", "narration": "...",
                "view": {"page": "patching", "settings": {"site": "head_out"}, "panel": "sweep",
                         "model": ..., "pair": {...} | "prompt_set": ..., "pair_id": ...}}]}
A step's view takes the story's model and pair unless it names its own.
"""
from __future__ import annotations

import html
import json
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import PromptPair, load_prompt_set
from explorer.core.runtime import REPO_ROOT
from explorer.surfaces import exports
from explorer.surfaces.views import PAGES, PAIR_KEYS, PROMPTS_DIR, Rendered, View, render

STORIES_DIR = REPO_ROOT / "stories"
MAX_BYTES = 1 << 20            # a story is a page of text; anything bigger is not one
SUFFIXES = (".json", ".toml")
STORY_KEYS = {"title", "description", "model", "device", "dtype", "pair", "prompt_set", "pair_id", "steps"}
STEP_KEYS = {"title", "narration", "view"}
VIEW_KEYS = {"page", "model", "device", "dtype", "pair", "prompt_set", "pair_id", "settings", "panel"}


@dataclass(frozen=True)
class Step:
    title: str
    narration: str
    view: View

    def to_dict(self) -> dict:
        return {"title": self.title, "narration": self.narration, "view": self.view.to_dict()}


@dataclass(frozen=True)
class Story:
    title: str
    steps: tuple[Step, ...]
    description: str = ""

    def to_dict(self) -> dict:
        out = {"title": self.title}
        if self.description:
            out["description"] = self.description
        out["steps"] = [s.to_dict() for s in self.steps]
        return out

    def with_step(self, step: Step) -> "Story":
        return replace(self, steps=self.steps + (step,))


# ---- reading and checking ----
def bundled_stories() -> list[Path]:
    return sorted(p for p in STORIES_DIR.glob("*") if p.suffix in SUFFIXES)


def load_story(path: str | Path) -> Story:
    path = Path(path)
    if not path.is_file():
        known = ", ".join(p.name for p in bundled_stories())
        raise ExplorerInputError(f"No story file at {path}. Bundled stories: {known or 'none'}.")
    if path.suffix not in SUFFIXES:
        raise ExplorerInputError(f"{path.name}: a story is a .json or .toml file.")
    if path.stat().st_size > MAX_BYTES:
        raise ExplorerInputError(f"{path.name} is {path.stat().st_size} bytes; a story file is at most {MAX_BYTES}.")
    return parse_story(path.read_bytes(), path.name, toml=path.suffix == ".toml")


def parse_story(raw: bytes | str, source: str = "story", toml: bool = False) -> Story:
    """Read and check a story; every problem in the file is listed in one ExplorerInputError."""
    if len(raw) > MAX_BYTES:
        raise ExplorerInputError(f"{source} is {len(raw)} bytes; a story file is at most {MAX_BYTES}.")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = tomllib.loads(text) if toml else json.loads(text)
    except UnicodeDecodeError as exc:
        raise ExplorerInputError(f"{source} is not UTF-8 text (byte {exc.start}).") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ExplorerInputError(f"{source} is not valid {'TOML' if toml else 'JSON'}: {exc}") from None
    problems: list[str] = []
    story = _story(data, problems)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ExplorerInputError(f"{source}: {len(problems)} problem(s) in this story: {shown}.")
    return story


def _text(obj: dict, key: str, where: str, problems: list, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        problems.append(f"{where}{key} must be {'a non-empty' if required else 'a'} string")
        return ""
    return value


def _unknown(obj: dict, allowed: set, where: str, problems: list) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        problems.append(f"{where}unknown key(s) {', '.join(map(repr, extra))} (allowed: {', '.join(sorted(allowed))})")


def _story(data, problems: list) -> Story | None:
    if not isinstance(data, dict):
        problems.append("the file must hold one object with a title and steps")
        return None
    _unknown(data, STORY_KEYS, "", problems)
    title = _text(data, "title", "", problems)
    description = _text(data, "description", "", problems, required=False)
    steps_data = data.get("steps")
    if not isinstance(steps_data, list) or not steps_data:
        problems.append("steps must be a non-empty list")
        return None
    defaults = {k: data[k] for k in ("model", "device", "dtype", "pair", "prompt_set", "pair_id") if k in data}
    steps = []
    for i, step in enumerate(steps_data, start=1):
        where = f"step {i}: "
        if not isinstance(step, dict):
            problems.append(f"{where}must be an object with title, narration and view")
            continue
        _unknown(step, STEP_KEYS, where, problems)
        step_title = _text(step, "title", where, problems)
        narration = _text(step, "narration", where, problems, required=False)
        view = _view(step.get("view"), defaults, where, problems)
        if view is not None:
            steps.append(Step(step_title, narration, view))
    return Story(title, tuple(steps), description)


def _view(data, defaults: dict, where: str, problems: list) -> View | None:
    if not isinstance(data, dict):
        problems.append(f"{where}view must be an object with at least a page")
        return None
    _unknown(data, VIEW_KEYS, f"{where}view: ", problems)
    merged = {**defaults, **data}
    if "pair" in data:   # a step's own pair replaces the story's prompt set, and the other way round
        merged.pop("prompt_set", None), merged.pop("pair_id", None)
    elif "prompt_set" in data:
        merged.pop("pair", None)
    page = merged.get("page")
    if page not in PAGES:
        problems.append(f"{where}view page {page!r} is not one of {', '.join(PAGES)}")
        return None
    panel = merged.get("panel", "")
    if panel and panel not in PAGES[page][1]:
        problems.append(f"{where}the {page} page has no panel {panel!r} (one of {', '.join(PAGES[page][1])})")
    model = merged.get("model", "demo")
    if not isinstance(model, str) or not model.strip():
        problems.append(f"{where}model must be a non-empty string")
    settings = merged.get("settings", {})
    if not isinstance(settings, dict) or not all(isinstance(v, (str, int, float, bool)) for v in settings.values()):
        problems.append(f"{where}settings must map setting names to strings or numbers")
        settings = {}
    pair = _pair(merged, where, problems)
    if pair is None:
        return None
    return View(page, model, pair, {str(k): str(v) for k, v in settings.items()}, panel,
                str(merged.get("device", "auto")), str(merged.get("dtype", "float32")))


def _pair(merged: dict, where: str, problems: list) -> PromptPair | None:
    if isinstance(merged.get("pair"), dict):
        fields = merged["pair"]
        bad = [k for k in PAIR_KEYS if not isinstance(fields.get(k), str) or not fields.get(k)]
        if bad:
            problems.append(f"{where}pair needs non-empty strings for {', '.join(bad)}")
            return None
        return PromptPair(**{k: fields[k] for k in PAIR_KEYS}, id=str(fields.get("id", "story")))
    name = merged.get("prompt_set")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}give a pair (clean, corrupted, clean_answer, corrupted_answer) or a prompt_set")
        return None
    path = PROMPTS_DIR / Path(name).name   # bundled sets only: a story is shared, a path on one machine is not
    if not path.is_file():
        problems.append(f"{where}no bundled prompt set {name!r} (see prompts/)")
        return None
    try:
        pairs = load_prompt_set(path).pairs
    except ExplorerInputError as exc:
        problems.append(f"{where}{exc}")
        return None
    pair_id = merged.get("pair_id")
    if pair_id is None:
        return next((p for p in pairs if p.category == "headline"), pairs[0] if pairs else None)
    found = [p for p in pairs if p.id == str(pair_id)]
    if not found:
        problems.append(f"{where}no pair with id {pair_id!r} in {name}")
        return None
    return found[0]


# ---- writing ----
def save_story(story: Story, path: str | Path) -> Path:
    """Write `story` as JSON, or TOML when the path ends in .toml; it loads back to the same story."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ExplorerInputError(f"{path.name}: save a story as .json or .toml.")
    text = to_toml(story.to_dict()) if path.suffix == ".toml" else story_json(story)
    path.write_text(text, encoding="utf-8")
    return path


def story_json(story: Story) -> str:
    return json.dumps(story.to_dict(), indent=2, ensure_ascii=False) + "\n"


def append_step(path: str | Path, step: Step, title: str = "My story") -> Story:
    """Add `step` at the end of the story at `path` (a new story called `title` if there is none)."""
    path = Path(path)
    story = load_story(path) if path.exists() else Story(title, ())
    story = story.with_step(step)
    save_story(story, path)
    return story


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON's string escapes are TOML's basic-string escapes (non-ASCII kept as is: no surrogate pairs).
    return json.dumps(str(value), ensure_ascii=False)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def to_toml(data: dict) -> str:
    """TOML for a story's shape: scalars, tables and the one array of tables (steps)."""
    lines: list[str] = []

    def table(obj: dict, prefix: str) -> None:
        for key, value in obj.items():
            if not isinstance(value, (dict, list)):
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in obj.items():
            name = f"{prefix}{_toml_key(key)}"
            if isinstance(value, dict):
                lines.extend(["", f"[{name}]"])
                table(value, name + ".")
            elif isinstance(value, list):
                for item in value:
                    lines.extend(["", f"[[{name}]]"])
                    table(item, name + ".")
    table(data, "")
    return "\n".join(lines) + "\n"


# ---- playing and exporting ----
def render_story(story: Story, load_model=None, progress=None) -> list[Rendered]:
    """Every step computed on its model (each model loaded once). A step that cannot be computed
    stops the export with one message naming the step."""
    if load_model is None:
        from explorer.sources.models import load_model
    models: dict = {}
    rendered = []
    for i, step in enumerate(story.steps, start=1):
        v = step.view
        if progress:
            progress((i - 1) / len(story.steps), f"step {i}/{len(story.steps)}: {step.title}")
        key = (v.model, v.device, v.dtype)
        try:
            if key not in models:
                models[key] = load_model(v.model, device=v.device, dtype=v.dtype)
            rendered.append(render(models[key], v))
        except ExplorerInputError as exc:
            raise ExplorerInputError(f"Step {i} ({step.title}): {exc}") from None
    if progress:
        progress(1.0, "done")
    return rendered


def export_html(story: Story, out: str | Path, load_model=None, progress=None, png_dir: str | Path | None = None
                ) -> Path:
    """Write the story as one HTML file (and, with png_dir, one PNG per step)."""
    rendered = render_story(story, load_model, progress)
    out = Path(out)
    out.write_text(story_html(story, rendered), encoding="utf-8")
    if png_dir is not None:
        folder = Path(png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(rendered, start=1):
            (folder / f"step{i:02d}_{r.name}.png").write_bytes(exports.chart_png(r.chart, r.spec))
    return out


def _portable(chart_spec: dict) -> dict:
    """The chart's Vega-Lite spec without its $schema URL (the file names no address at all)."""
    return {k: v for k, v in chart_spec.items() if k != "$schema"}


STYLE = """
body{margin:0;font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#1d1d1f;background:#fff}
header{display:flex;justify-content:space-between;align-items:center;padding:10px 32px;border-bottom:1px solid #ddd;
 font-size:18px;color:#555}
section.step{display:none;padding:16px 40px 80px}
section.step.active{display:block}
h1{font-size:44px;margin:40px 0 12px}
h2{font-size:34px;margin:8px 0 10px}
p.narration{font-size:24px;line-height:1.4;max-width:1100px;margin:0 0 18px}
p.caption,details{font-size:14px;color:#555;max-width:1200px}
ol.contents{font-size:24px;line-height:1.6}
nav{position:fixed;bottom:0;left:0;right:0;display:flex;gap:12px;justify-content:center;padding:10px;
 background:rgba(255,255,255,.92);border-top:1px solid #ddd}
nav button{font-size:20px;padding:6px 22px;border-radius:8px;border:1px solid #aaa;background:#f5f5f7;cursor:pointer}
.chart{overflow-x:auto}
@media print{section.step{display:block;page-break-after:always}nav,header{display:none}}
"""

SCRIPT = """
(function(){
  const sections = Array.from(document.querySelectorAll('section.step'));
  const drawn = new Set();
  function draw(i){
    if (drawn.has(i)) return;
    drawn.add(i);
    const data = document.getElementById('spec-' + i);
    if (!data) return;
    vegaEmbed('#chart-' + i, JSON.parse(data.textContent), {actions: false, renderer: 'svg'})
      .catch(function(e){ document.getElementById('chart-' + i).textContent = 'Chart error: ' + e; });
  }
  let current = 0;
  function show(i){
    current = Math.max(0, Math.min(sections.length - 1, i));
    sections.forEach(function(s, j){ s.classList.toggle('active', j === current); });
    document.getElementById('counter').textContent = current === 0 ? 'title' : current + ' / ' + (sections.length - 1);
    draw(current);
    if (location.hash !== '#' + current) history.replaceState(null, '', '#' + current);
  }
  document.getElementById('prev').onclick = function(){ show(current - 1); };
  document.getElementById('next').onclick = function(){ show(current + 1); };
  document.addEventListener('keydown', function(e){
    if (['ArrowRight', 'PageDown', ' '].includes(e.key)) { show(current + 1); e.preventDefault(); }
    if (['ArrowLeft', 'PageUp'].includes(e.key)) { show(current - 1); e.preventDefault(); }
    if (e.key === 'Home') show(0);
    if (e.key === 'End') show(sections.length - 1);
  });
  window.addEventListener('beforeprint', function(){ sections.forEach(function(_, j){ draw(j); }); });
  show(parseInt(location.hash.slice(1)) || 0);
})();
"""


def story_html(story: Story, rendered: list[Rendered]) -> str:
    """The talk as one page: Vega, Vega-Lite and vega-embed inline (vl-convert's bundle), each step's
    chart spec and data in a JSON block, next/previous buttons and arrow keys. Opens from a file."""
    import vl_convert as vlc
    esc = html.escape
    contents = "".join(f"<li>{esc(s.title)}</li>" for s in story.steps)
    sections = [f'<section class="step" id="step-0"><h1>{esc(story.title)}</h1>'
                f'<p class="narration">{esc(story.description)}</p><ol class="contents">{contents}</ol>'
                '<p class="caption">→ / ← or the buttons below move between steps; the browser prints every '
                'step on its own page.</p></section>']
    for i, (step, r) in enumerate(zip(story.steps, rendered), start=1):
        spec_block = exports.script_json(_portable(exports.chart_dict(r.chart)))
        run = exports.script_json(r.spec)
        sections.append(
            f'<section class="step" id="step-{i}"><h2>{i}. {esc(step.title)}</h2>'
            f'<p class="narration">{esc(step.narration)}</p><div class="chart" id="chart-{i}"></div>'
            f'<p class="caption">{esc(r.caption)}</p>'
            f'<details><summary>What was run</summary><p>{esc(exports.spec_line(r.spec))}</p>'
            f'<p>Page {esc(step.view.page)}, settings {esc(json.dumps(step.view.settings, ensure_ascii=False))}</p>'
            f'</details>'
            f'<script type="application/json" id="spec-{i}">{spec_block}</script>'
            f'<script type="application/json" id="run-{i}">{run}</script></section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(story.title)}</title><style>{STYLE}</style>"
            f"<script>{vlc.javascript_bundle()}</script></head><body>"
            f"<header><span>{esc(story.title)}</span><span id=\"counter\"></span></header>"
            + "\n".join(sections)
            + '<nav><button id="prev">← Previous</button><button id="next">Next →</button></nav>'
            f"<script>{SCRIPT}</script></body></html>\n")
