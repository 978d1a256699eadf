"""Security: no unpickling or eval in the code, remote code only by choice, hashed cache names,
bounded uploads, and model paths from a URL restricted to known places."""
import ast
import inspect
import json
import os
import re
import time
from pathlib import Path

import pytest

from explorer.core import cache
from explorer.core.errors import ExplorerInputError
from explorer.sources.models import DEMO_MODEL_DIR, allowed_model, load_model
from explorer.core.prompts import (MAX_PROMPT_SET_BYTES, MAX_PROMPT_SET_LINES, MAX_REPORTED_ERRORS, PromptPair,
                              load_prompt_set, parse_jsonl, tokenize_pair)
from explorer.core.runtime import cache_dir
from tests.conftest import ROOT, TEST_DEVICE, TEST_DTYPE

# ---- the code itself ----
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load",
              "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "pd.read_pickle",
              "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads"}
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load, '' for anything that is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(parts)])


def _keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_calls(source: str) -> list[str]:
    """'line N: what' for each unsafe construct in Python source. The ast sees only code, so a
    comment or a string that mentions pickle.load does not count."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")  # a bare load() would hide the module
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy") and \
                any(a.name == "load" for a in node.names):
            found.append(f"{where}: from {node.module} import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in UNPICKLERS:
                found.append(f"{where}: {name}()")
            elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: torch.load() without weights_only=True")
            elif name in ("np.load", "numpy.load") and not _keyword_is(node, "allow_pickle", False):
                found.append(f"{where}: {name}() without allow_pickle=False")
            elif name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
                found.append(f"{where}: {name}()")
            elif _keyword_is(node, "trust_remote_code", True):
                found.append(f"{where}: trust_remote_code=True")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and \
                        isinstance(value, ast.Constant) and value.value is True:
                    found.append(f"{where}: {{'trust_remote_code': True}}")
    return found


def _product_sources() -> list[Path]:
    files = [*(ROOT / "explorer").rglob("*.py"), ROOT / "app.py", *(ROOT / "pages").glob("*.py"),
             *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "docs").glob("*.py")]
    return sorted(f for f in files if f.is_file())


def test_the_scanner_sees_code_and_ignores_comments_and_strings():
    source = '''
import pickle, torch, numpy as np
from pickle import loads
# pickle.load(fh), eval("x"), torch.load(p) in a comment do not count
doc = "pickle.loads(b) eval(s) exec(s) np.load(p) trust_remote_code=True"
a = pickle.load(fh)
b = torch.load(p)
c = torch.load(p, weights_only=True)
d = np.load(p)
e = np.load(p, allow_pickle=False)
f = eval("1 + 1")
exec("g = 1")
model.eval()
h = from_pretrained(x, trust_remote_code=True)
i = dict(**{"trust_remote_code": True})
j = from_pretrained(x, trust_remote_code=flag)
k = safetensors.torch.load(blob)
'''
    found = sorted((int(f.split(":")[0].split()[1]), f.split(": ", 1)[1]) for f in unsafe_calls(source))
    assert found == [(3, "from pickle import ..."), (6, "pickle.load()"), (7, "torch.load() without weights_only=True"),
                     (9, "np.load() without allow_pickle=False"), (11, "eval()"), (12, "exec()"),
                     (14, "trust_remote_code=True"), (15, "{'trust_remote_code': True}")]


def test_no_unpickling_eval_or_remote_code_in_the_product():
    sources = _product_sources()
    assert ROOT / "explorer" / "core" / "cache.py" in sources and ROOT / "app.py" in sources and len(sources) > 20
    problems = [f"{path.relative_to(ROOT)} {finding}" for path in sources
                for finding in unsafe_calls(path.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


# ---- trust_remote_code only by choice ----
def test_remote_code_is_off_unless_chosen():
    import explorer.surfaces.cli

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    parser_source = inspect.getsource(explorer.surfaces.cli)
    assert re.search(r'"--trust-remote-code", action="store_true"', parser_source)  # off unless given


def _with_remote_code(folder: Path, file: str = "config.json") -> Path:
    """Declare custom code in a model folder, code that would leave a mark if it ever ran."""
    config = json.loads((folder / file).read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / file).write_text(json.dumps(config))
    marker = folder / "code_ran"
    for module in ("configuration_evil.py", "modeling_evil.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return marker


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_a_model_that_ships_code_is_refused_with_how_to_opt_in(tmp_path, file):
    from explorer.sources.tiny import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "custom")  # a known model_type: transformers alone would load it
    marker = _with_remote_code(folder, file)
    with pytest.raises(ExplorerInputError) as err:
        load_model(str(folder), device=TEST_DEVICE, dtype=TEST_DTYPE)
    message = str(err.value)
    assert "ships its own Python code" in message and "AutoModelForCausalLM" in message
    assert "trust_remote_code=True" in message and "--trust-remote-code" in message
    assert not marker.exists()


# ---- cache names from hashes ----
NASTY_WORDS = ["../../etc/passwd", "..\\..\\boot.ini", "a/b", "..", "名前", "naïve", "🙂", "con:aux", "x" * 3000]


def _model_with_words(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from explorer.sources.tiny import TINY_VOCAB, tiny_config, word_level_tokenizer

    tokenizer = word_level_tokenizer(TINY_VOCAB + NASTY_WORDS)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), attn_implementation="eager")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cache_file_names_are_hashes_whatever_the_prompt_or_folder(tmp_path, monkeypatch):
    from explorer.analyses.baseline import baseline
    from explorer.analyses.patching import patch_sweep

    monkeypatch.setenv("CIRCUIT_EXPLORER_CACHE", str(tmp_path / "cache"))
    cache.clear_memory()
    folder = _model_with_words(tmp_path / "models" / "dir ü 名 ..name")
    model_arg = str(tmp_path / "models" / ".." / "models" / folder.name)  # the user's text, '..' and all
    lm = load_model(model_arg, device=TEST_DEVICE, dtype=TEST_DTYPE)
    clean = " ".join(["w1", *NASTY_WORDS, "w2"])
    corrupted = " ".join(["w1", *reversed(NASTY_WORDS), "w2"])
    tp = tokenize_pair(lm.tokenizer, PromptPair(clean, corrupted, "w3", "w4", id="../../pair"))
    baseline(lm, tp)
    patch_sweep(lm, tp, "resid_post", positions="last")
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    entries = [p for p in written if p.parent.name in ("activations", "results")]
    assert len(entries) >= 3  # two baseline runs and one sweep result
    assert all(re.fullmatch(r"[0-9a-f]{64}\.safetensors", p.name) for p in entries), entries
    assert {p.relative_to(tmp_path / "cache").parts[0] for p in written} <= {"activations", "results",
                                                                            "weight_hashes.json"}
    cache.clear_memory()


# ---- uploads ----
def test_an_oversized_prompt_set_is_refused_with_one_message(tmp_path):
    line = json.dumps({"clean": "w1 w2", "corrupted": "w1 w3", "clean_answer": "w4", "corrupted_answer": "w5",
                       "notes": "n" * 200})
    text = (line + "\n") * (MAX_PROMPT_SET_BYTES // len(line) + 1)
    with pytest.raises(ExplorerInputError, match=r"is 2\d\.\d MB; prompt sets are limited to 21 MB"):
        parse_jsonl(text, path="upload.jsonl")
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as fh:  # sparse: the size is what is checked, before any reading
        fh.truncate(MAX_PROMPT_SET_BYTES + 1)
    with pytest.raises(ExplorerInputError, match="limited to 21 MB. Split it"):
        load_prompt_set(big)
    under = parse_jsonl(text[:MAX_PROMPT_SET_BYTES - 1000])  # just under the limit: loads
    assert len(under.pairs) > 60_000 and len(under.errors) == 1  # the last line was cut in two


def test_a_huge_number_of_lines_stays_bounded():
    start = time.perf_counter()
    with pytest.raises(ExplorerInputError, match=f"more than {MAX_PROMPT_SET_LINES:,} lines"):
        parse_jsonl("\n" * (MAX_PROMPT_SET_BYTES - 1))  # 20 million empty lines
    bad = parse_jsonl("not json\n" * (MAX_PROMPT_SET_LINES - 1))
    assert time.perf_counter() - start < 10
    assert len(bad.errors) == MAX_REPORTED_ERRORS + 1 and not bad.pairs
    assert bad.errors[-1] == f"... and {MAX_PROMPT_SET_LINES - 1 - MAX_REPORTED_ERRORS} more bad lines " \
                             f"({MAX_PROMPT_SET_LINES - 1} in all)"


# ---- model paths from a URL ----
def test_model_paths_from_a_url_are_restricted(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUIT_EXPLORER_CACHE", str(tmp_path / "cache"))
    typed = tmp_path / "mine" / "model"
    typed.mkdir(parents=True)
    prepared = cache_dir() / "models" / "smollm2-x"
    prepared.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (cache_dir() / "models" / "link").symlink_to(outside)
    session = {str(typed), "HuggingFaceTB/SmolLM2-135M"}

    for model in ("demo", "smollm2", "", str(DEMO_MODEL_DIR), str(prepared), str(typed),
                  str(tmp_path / "mine" / "." / ".." / "mine" / "model"), "HuggingFaceTB/SmolLM2-135M"):
        assert allowed_model(model, session), model
    for model in ("/etc", "../../etc/passwd", str(outside), str(cache_dir() / "models" / "link"),
                  str(cache_dir() / "models" / ".." / ".." / "elsewhere"), str(cache_dir()), "gpt2",
                  "meta-llama/Llama-3.1-8B", str(typed) + "\0", "~root"):
        assert not allowed_model(model, session), model
    assert not allowed_model(str(typed), set())  # typed in another session does not count here
