"""The package's layers: core <- sources <- analyses <- surfaces, and streamlit only in the UI."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "explorer"
ALLOWED = {  # layer -> the explorer layers its modules may import
    "core": {"core"},
    "sources": {"core", "sources"},
    "analyses": {"core", "sources", "analyses"},
    "surfaces": {"core", "sources", "analyses", "surfaces"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "explorer":
                found |= {f"explorer.{a.name}" for a in node.names}
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "explorer" and parts[1] in ALLOWED else None


def test_every_module_sits_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == [], f"modules outside the layers: {loose}"
    for layer in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"explorer/{layer}/__init__.py must say what the layer may import"


def test_layers_import_only_downwards_and_streamlit_only_in_ui():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if len(rel) < 2:
            continue
        layer = rel[0]
        in_ui = rel[:2] == ("surfaces", "ui")
        for module in _imports(path):
            target = _layer_of(module)
            if target is not None and target not in ALLOWED[layer]:
                wrong.append(f"{'/'.join(rel)} imports {module}")
            if module.split(".")[0] == "streamlit" and not in_ui:
                wrong.append(f"{'/'.join(rel)} imports streamlit")
    assert wrong == []


def test_only_the_engine_opens_traces():
    """nnsight traces on a shared model are not thread safe: engine.py owns the trace and the lock."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "engine.py" and (".trace(" in text or ".lock" in text and "with lm.lock" in text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
