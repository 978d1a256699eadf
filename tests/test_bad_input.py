"""The bad-input catalogue: each case gets one clear line and exit status 2 from the CLI (no
traceback), and, where the app offers that input, one message in the page after which the next
valid input works. `python -m tests.test_bad_input` prints the table in docs/bad_input.md."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import pytest

from explorer.core.runtime import REPO_ROOT
from explorer.surfaces.ui.state import DEMO_PAIR

PAIR = ["--clean", DEMO_PAIR.clean, "--corrupted", DEMO_PAIR.corrupted,
        "--clean-answer", DEMO_PAIR.clean_answer, "--corrupted-answer", DEMO_PAIR.corrupted_answer]
LONG = " ".join(["Mango"] * 70)
# A pair in the tiny random models' vocabulary (explorer/sources/tiny.py).
TINY_PAIR = ["--clean", "w1 w2 w3 w4", "--corrupted", "w1 w5 w3 w4", "--clean-answer", "w6", "--corrupted-answer", "w7"]


def with_pair(**changes) -> list[str]:
    """The demo pair's CLI arguments with some fields changed (keys as in PromptPair)."""
    fields = {**DEMO_PAIR.to_dict(), **changes}
    return ["--clean", fields["clean"], "--corrupted", fields["corrupted"], "--clean-answer", fields["clean_answer"],
            "--corrupted-answer", fields["corrupted_answer"]]


@dataclass
class Case:
    id: str
    what: str
    cli: list[str]                     # arguments after `python -m explorer`; {tmp} is the case's folder
    message: str                       # a fragment of the one line the user gets
    app: dict = field(default_factory=dict)   # how the app meets it: {"page", "set": {widget key: value}} or "query"
    fix: dict = field(default_factory=dict)   # the next valid input: {widget key: value}


def model_case(id: str, what: str, folder: str, message: str) -> Case:
    """A model the CLI names with --model and a person types under Model > other in the sidebar."""
    return Case(id, what, ["baseline", "--model", folder, *PAIR], message,
                {"set": {"w.model_choice": "other", "w.model_path": folder}}, {"w.model_choice": "demo"})


CATALOGUE = [
    Case("empty-prompt", "empty clean prompt", ["baseline", *with_pair(clean="")], "clean prompt is empty",
         {"set": {"w.clean": ""}}, {"w.clean": DEMO_PAIR.clean}),
    Case("blank-prompt", "whitespace-only corrupted prompt", ["baseline", *with_pair(corrupted="   ")],
         "corrupted prompt is empty", {"set": {"w.corrupted": "   "}}, {"w.corrupted": DEMO_PAIR.corrupted}),
    Case("multi-token-answer", "an answer of two tokens", ["baseline", *with_pair(clean_answer="Mango Peach")],
         "2 tokens, not one", {"set": {"w.clean_answer": "Mango Peach"}}, {"w.clean_answer": "Mango"}),
    Case("empty-answer", "an empty answer", ["baseline", *with_pair(corrupted_answer="")], "corrupted answer is empty",
         {"set": {"w.corrupted_answer": ""}}, {"w.corrupted_answer": "Orange"}),
    Case("same-answers", "both answers the same token", ["baseline", *with_pair(corrupted_answer="Mango")],
         "are the same token", {"set": {"w.corrupted_answer": "Mango"}}, {"w.corrupted_answer": "Orange"}),
    Case("answer-not-in-vocab", "an answer the vocabulary does not have",
         ["baseline", *with_pair(clean_answer="Zebra")], "not in this model's vocabulary",
         {"set": {"w.clean_answer": "Zebra"}}, {"w.clean_answer": "Mango"}),
    Case("unknown-word", "a prompt word the vocabulary does not know",
         ["baseline", *with_pair(clean=DEMO_PAIR.clean.replace("Man", "Zebra"))], "does not know: 'Zebra'",
         {"set": {"w.clean": DEMO_PAIR.clean.replace("Man", "Zebra")}}, {"w.clean": DEMO_PAIR.clean}),
    Case("too-long", "a prompt longer than the model's context (64 positions)",
         ["baseline", *with_pair(clean=LONG)], "longer than this model's context of 64",
         {"set": {"w.clean": LONG}}, {"w.clean": DEMO_PAIR.clean}),
    Case("unequal-lengths", "per-position patching of prompts of different token lengths",
         ["patch", *with_pair(corrupted=DEMO_PAIR.corrupted + " 1"), "--positions", "each"],
         "same number of tokens"),
    Case("layer-out-of-range", "a layer the model does not have", ["patch", *PAIR, "--layers", "7"],
         "Layer 7 is out of range"),
    Case("head-out-of-range", "a head the layer does not have", ["patch", *PAIR, "--heads", "1.99"], "Head 99",
         {"page": "pages/6_Attention.py", "query": {"attention.heads": "1.99"}},
         {"w.attention.heads": "1.2"}),
    Case("head-set-out-of-range", "a head set naming layer 9", ["patch", *PAIR, "--heads", "9.0"],
         "Layer 9 is out of range",
         {"page": "pages/1_Patching.py", "query": {"patching.heads": "9.0"}}, {"w.patching.heads": "2.0, 3.1"}),
    Case("malformed-heads", "a head list that is not LAYER.HEAD", ["patch", *PAIR, "--heads", "two.one"],
         "LAYER.HEAD", {"page": "pages/1_Patching.py", "query": {"patching.heads": "two.one"}},
         {"w.patching.heads": "2.1"}),
    Case("position-out-of-range", "an ablation position past the prompt's end",
         ["ablate", *PAIR, "--targets", "L1H0", "--positions", "99"], "Position 99 is out of range"),
    Case("malformed-positions", "positions that are not integers",
         ["ablate", *PAIR, "--targets", "L1H0", "--positions", "first"], "--positions must be all, last"),
    Case("unknown-site", "a site name the adapters do not know", ["patch", *PAIR, "--site", "resid_middle"],
         "Unknown site"),
    Case("bad-receiver", "a path-patching receiver that is not q/k/v or logits",
         ["patch", *PAIR, "--receiver", "3.1.x"], "q, k or v",
         {"page": "pages/1_Patching.py", "query": {"patching.receiver": "3.1.x"}}, {"w.patching.receiver": "3.1.q"}),
    Case("bad-target", "an ablation target in a layer the model does not have",
         ["ablate", *PAIR, "--targets", "L9H0"], "Layer 9",
         {"page": "pages/2_Ablation.py", "query": {"ablation.targets": "L9H0"}}, {"w.ablation.targets": "L1H0"}),
    Case("unreadable-target", "an ablation target that names nothing", ["ablate", *PAIR, "--targets", "neuron5"],
         "neuron5", {"page": "pages/2_Ablation.py", "query": {"ablation.targets": "neuron5"}},
         {"w.ablation.targets": "mlp1"}),
    Case("unknown-method", "an ablation method that does not exist",
         ["ablate", *PAIR, "--targets", "L1H0", "--method", "shuffle"], "invalid choice"),
    model_case("unknown-model", "a model folder that does not exist", "/no/such/model", "does not exist"),
    model_case("no-config", "a folder without config.json", "{tmp}/empty", "no config.json"),
    model_case("no-weights", "a model folder without weight files", "{tmp}/noweights", "weights"),
    model_case("weights-mismatch", "weights that do not match the config", "{tmp}/mismatch", "do not match"),
    model_case("remote-code", "a model that needs trust_remote_code", "{tmp}/remote", "trust_remote_code"),
    model_case("unknown-family", "an architecture with no adapter", "{tmp}/bert", "not supported yet"),
    Case("linear-attention-head", "a head slot in a linear-attention (Gated DeltaNet) layer where a pattern is "
         "needed", ["patch", "--model", "{tmp}/hybrid", *TINY_PAIR, "--receiver", "1.1.q"],
         "needs a softmax attention layer"),
    Case("fp16-overflow", "activations that overflow float16 (inf/NaN logits)",
         ["baseline", "--model", "{tmp}/overflow", "--dtype", "float16", *TINY_PAIR], "overflowed to inf/NaN"),
    Case("no-device", "a device the machine does not have", ["baseline", "--device", "cuda:7", *PAIR], "cuda",
         {"set": {"w.device": "cuda"}}, {"w.device": "auto"}),
    Case("unknown-dtype", "a dtype that is not offered", ["baseline", "--dtype", "float8", *PAIR], "Unknown dtype 'float8'"),
    Case("missing-set", "a prompt set that does not exist", ["patch", "--prompts", "{tmp}/none.jsonl"],
         "does not exist"),
    Case("malformed-set", "a JSONL file whose every line is broken", ["patch", "--prompts", "{tmp}/broken.jsonl"],
         "has no valid pairs"),
    Case("empty-set", "an empty JSONL file", ["patch", "--prompts", "{tmp}/empty.jsonl"], "has no valid pairs"),
    Case("huge-set", "a JSONL file over the size limit", ["patch", "--prompts", "{tmp}/huge.jsonl"], "MB"),
    Case("not-utf8-set", "a JSONL file that is not UTF-8", ["patch", "--prompts", "{tmp}/latin1.jsonl"],
         "is not UTF-8 text"),
    Case("no-command", "no command at all", [], "Give a command"),
    Case("missing-answer-flag", "a pair without its answers", ["baseline", "--clean", "a"], "required"),
]


def make_case_dir(root):
    """Folders and files the cases name: broken model folders and broken prompt sets."""
    from safetensors.torch import load_file, save_file

    from explorer.core.prompts import MAX_PROMPT_SET_BYTES
    from explorer.sources.tiny import build_tiny_model
    (root / "empty").mkdir()
    good = build_tiny_model("llama", root / "good")
    shutil.copytree(good, root / "noweights")
    for f in (root / "noweights").glob("*.safetensors"):
        f.unlink()
    shutil.copytree(good, root / "mismatch")
    config = json.loads((good / "config.json").read_text())
    (root / "mismatch" / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    shutil.copytree(good, root / "remote")
    (root / "remote" / "config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    shutil.copytree(good, root / "bert")
    (root / "bert" / "config.json").write_text(json.dumps({**config, "model_type": "bert",
                                                           "architectures": ["BertForMaskedLM"]}))
    build_tiny_model("qwen3_5", root / "hybrid")   # three Gated DeltaNet layers, then softmax attention
    overflow = build_tiny_model("llama", root / "overflow")
    weights = load_file(str(overflow / "model.safetensors"))   # matrices x300: fp16's range is exceeded
    save_file({k: v * 300.0 if v.dim() == 2 else v for k, v in weights.items()},
              str(overflow / "model.safetensors"), metadata={"format": "pt"})
    (root / "broken.jsonl").write_text("not json\n{\"clean\": 3}\n[1, 2]\n")
    (root / "empty.jsonl").write_text("")
    with open(root / "huge.jsonl", "wb") as fh:
        fh.truncate(MAX_PROMPT_SET_BYTES + 1)   # sparse: big on paper, nothing written
    (root / "latin1.jsonl").write_bytes('{"clean": "caf\u00e9"}\n'.encode("latin-1"))
    return root


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return make_case_dir(tmp_path_factory.mktemp("bad_input"))


def fill(values, root) -> object:
    if isinstance(values, dict):
        return {k: fill(v, root) for k, v in values.items()}
    if isinstance(values, list):
        return [fill(v, root) for v in values]
    return values.replace("{tmp}", str(root)) if isinstance(values, str) else values


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_cli_gives_one_line_and_status_2(case, case_dir, capsys):
    from explorer.surfaces.cli import main
    assert main(fill(case.cli, case_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert case.message in err, err


APP_CASES = [c for c in CATALOGUE if c.app]


@pytest.mark.parametrize("case", APP_CASES, ids=[c.id for c in APP_CASES])
def test_app_gives_one_message_and_recovers(case, case_dir, demo_model):
    from tests.test_app import page
    app, fix = fill(case.app, case_dir), fill(case.fix, case_dir)
    name = app.get("page", "pages/4_DLA.py")
    at = page(name)
    for k, v in app.get("query", {}).items():
        at.query_params[k] = v
    at.run()
    for key, value in app.get("set", {}).items():
        widget(at, key).set_value(value).run()
    assert not at.exception, at.exception
    messages = [e.value for e in at.error]
    assert len(messages) == 1 and case.message in messages[0], messages
    for key, value in fix.items():
        widget(at, key).set_value(value).run()
    assert not at.exception and not at.error, [e.value for e in at.error]


def widget(at, key: str):
    """The text area, text input or selectbox with this key."""
    for kind in ("text_area", "text_input", "selectbox"):
        found = [w for w in at.get(kind) if getattr(w, "key", None) == key]
        if found:
            return found[0]
    raise KeyError(key)


def test_catalogue_is_in_the_docs():
    """docs/bad_input.md lists every case with the message it gets (python -m tests.test_bad_input)."""
    docs = (REPO_ROOT / "docs" / "bad_input.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in docs.splitlines() if line.startswith("| ")}
    for case in CATALOGUE:
        assert case.id in rows and case.message in rows[case.id], case.id


def shown_cli(args: list[str]) -> str:
    """How a case's command reads in the docs: the demo pair and long prompts abbreviated."""
    import shlex
    names = {DEMO_PAIR.clean: "$CLEAN", DEMO_PAIR.corrupted: "$CORRUPTED", LONG: "'Mango Mango ... (70 words)'"}
    names.update({t: shlex.quote(t) for t in TINY_PAIR})
    return "python -m explorer " + " ".join(names.get(a, shlex.quote(a).replace("|", "\\|")) for a in args
                                            ).replace("{tmp}", "…")


def table() -> str:
    """The docs table, with the message each case really gets from the CLI."""
    import contextlib
    import io
    import tempfile
    from pathlib import Path

    from explorer.surfaces.cli import main
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_case_dir(Path(tmp))
        for c in CATALOGUE:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = main(fill(c.cli, root))
            message = err.getvalue().strip().replace(tmp, "…").replace("|", "\\|")
            rows.append(f"| {c.id} | {c.what} | `{shown_cli(c.cli)}` | {status} | {message} | "
                        f"{'yes' if c.app else ''} |")
    head = ["# Bad input: what each gets", "",
            "Generated by `python -m tests.test_bad_input > docs/bad_input.md`; `tests/test_bad_input.py` checks "
            "every case in the command line (exit status 2, one line on stderr, no traceback) and, where the app "
            "offers that input, in the app (one message on the page, then the next valid input works). "
            f"{len(CATALOGUE)} cases, {len(APP_CASES)} of them in the app too. `$CLEAN` and `$CORRUPTED` stand for "
            "the demo pair's prompts; `…` for a temporary folder the test makes.", "",
            "Faults that are survived rather than reported are tested elsewhere: a corrupt or truncated cache "
            "entry is discarded and recomputed with a warning (`tests/test_cache.py`); an out-of-memory error "
            "halves the batch once, then says what to change (`tests/test_budget.py`); a model folder removed "
            "while the app runs (`tests/test_models.py`); a URL naming a model folder, hub id or an unknown "
            "setting value opens the default view with a notice (`tests/test_app.py`).", "",
            "| case | input | command | exit | message | app |", "|---|---|---|---|---|---|"]
    return "\n".join(head + rows) + "\n"


if __name__ == "__main__":
    print(table(), end="")
