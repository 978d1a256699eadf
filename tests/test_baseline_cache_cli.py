"""Baseline numbers, the activation cache and the CLI contract."""
import json
import subprocess
import sys

import pytest
import torch

from explorer.core import cache
from explorer.analyses.baseline import baseline
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.core.runtime import REPO_ROOT
from tests.conftest import HALF, cli_model_args, tol
from tests.device_guard import paused

DEMO_PAIR = PromptPair("Then , Anna and Tom had fun at the park . Tom gave a key to",
                       "Then , Anna and Tom had fun at the park . Anna gave a key to", "Anna", "Tom")


def plain_transformers_ld(folder, pair):
    """The reference: plain transformers, float32, on the CPU (where the device guard cannot follow it)."""
    with paused():
        return _plain_transformers_ld(folder, pair)


def _plain_transformers_ld(folder, pair):
    from transformers import AutoModelForCausalLM
    from explorer.sources.models import load_tokenizer
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    a, b = tok.convert_tokens_to_ids(pair.clean_answer), tok.convert_tokens_to_ids(pair.corrupted_answer)
    out = []
    with torch.no_grad():
        for text in (pair.clean, pair.corrupted):
            logits = model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1]
            out.append(float(logits[a] - logits[b]))
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "explorer", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_baseline_json_equals_plain_transformers():
    from explorer.sources.models import DEMO_MODEL_DIR
    proc = run_cli("baseline", "--model", "demo", "--clean", DEMO_PAIR.clean, "--corrupted", DEMO_PAIR.corrupted,
                   "--clean-answer", "Anna", "--corrupted-answer", "Tom", "--json", *cli_model_args())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ref_clean, ref_corr = plain_transformers_ld(DEMO_MODEL_DIR, DEMO_PAIR)
    assert out["ld_clean"] == pytest.approx(ref_clean, abs=tol("wide", fp32=1e-5))
    assert out["ld_corrupted"] == pytest.approx(ref_corr, abs=tol("wide", fp32=1e-5))
    assert len([r for r in out["top_tokens"] if r["run"] == "clean"]) == 10
    assert out["top_tokens"][0]["token"] == "Anna"


def test_baseline_probabilities(demo_model):
    res = baseline(demo_model, DEMO_PAIR)
    clean = res.answers[(res.answers["run"] == "clean") & (res.answers["answer"] == "clean_answer")].iloc[0]
    assert 0.9 < clean["prob"] <= 1.0
    assert res.ld_clean > 0 > res.ld_corrupted


@pytest.mark.parametrize("args, message", [
    (["baseline", "--clean", "", "--corrupted", "x", "--clean-answer", "Anna", "--corrupted-answer", "Tom"], "prompt is empty"),
    (["baseline", "--clean", "Anna", "--corrupted", "Tom", "--clean-answer", "Anna Tom", "--corrupted-answer", "Tom"], "2 tokens, not one"),
    (["baseline", "--clean", " ".join(["Anna"] * 70), "--corrupted", "Tom", "--clean-answer", "Anna", "--corrupted-answer", "Tom"], "longer than this model's context of 64"),
    (["baseline", "--clean", "Anna and Tom", "--corrupted", "Tom and Anna", "--clean-answer", "Anna", "--corrupted-answer", "Anna"], "are the same token"),
    (["baseline", "--clean", "Anna and zebra", "--corrupted", "Tom", "--clean-answer", "Anna", "--corrupted-answer", "Tom"], "does not know: 'zebra'"),
    (["baseline", "--model", "/nope/model", "--clean", "a", "--corrupted", "b", "--clean-answer", "Anna", "--corrupted-answer", "Tom"], "does not exist"),
    (["patch", "--clean", "Anna and Tom", "--corrupted", "Anna Tom", "--clean-answer", "Anna", "--corrupted-answer", "Tom"], "same number of tokens"),
    (["patch", "--clean", "Anna", "--corrupted", "Tom", "--clean-answer", "Anna", "--corrupted-answer", "Tom", "--layers", "7"], "Layer 7 is out of range"),
    (["patch", "--clean", "Anna", "--corrupted", "Tom", "--clean-answer", "Anna", "--corrupted-answer", "Tom", "--heads", "1.99"], "Head 99"),
    (["patch", "--clean", "Anna", "--corrupted", "Tom", "--clean-answer", "Anna", "--corrupted-answer", "Tom", "--site", "nope"], "Unknown site"),
    (["baseline", "--clean", "a"], "required"),
    (["patch", "--clean", "a"], "or --prompts FILE"),
    (["patch", "--prompts", "/nope.jsonl"], "does not exist"),
    ([], "Give a command"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message, capsys):
    from explorer.surfaces.cli import main
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_cli_bad_input_in_a_real_process():
    proc = run_cli("patch", "--clean", "Anna and Tom", "--corrupted", "Anna Tom", "--clean-answer", "Anna",
                   "--corrupted-answer", "Tom")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "same number of tokens" in proc.stderr


def test_cli_patch_json_records():
    proc = run_cli("patch", "--clean", DEMO_PAIR.clean, "--corrupted", DEMO_PAIR.corrupted, "--clean-answer", "Anna",
                   "--corrupted-answer", "Tom", "--site", "head_out", "--positions", "all", "--json", *cli_model_args())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["records"]) == 4 * 8 and {"layer", "head", "recovery"} <= set(out["records"][0])
    assert "head_out" in out["title"] and "denoise" in out["title"]


def test_cli_patch_over_a_prompt_set(demo_model, capsys):
    from explorer.surfaces.cli import main
    from explorer.analyses.patching import sweep_over_pairs
    from explorer.core.prompts import load_prompt_set
    path = REPO_ROOT / "prompts" / "demo_factual_recall.jsonl"
    assert main(["patch", "--prompts", str(path), "--max-pairs", "3", "--site", "resid_post", "--positions", "last",
                 "--direction", "noise", "--json", *cli_model_args()]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = sweep_over_pairs(demo_model, load_prompt_set(path).by_category("headline")[:3], "resid_post", "last", "noise")
    assert [r["mean_damage"] for r in out["records"]] == pytest.approx(list(ref.summary["mean_damage"]), abs=1e-6)
    assert len(out["per_pair"]) == 3 * 4 and "over 3 pairs" in out["title"]


def test_revisit_runs_no_forward_pass(demo_model):
    tp = tokenize_pair(demo_model.tokenizer, DEMO_PAIR)
    reads = [("resid_post", 1), ("head_out", 2)]
    cache.clear_memory()
    before = demo_model.forward_calls
    logits, acts = cache.get_activations(demo_model, tp.clean_ids, reads)
    first = demo_model.forward_calls
    assert first in (before, before + 1)  # may already be on disk from an earlier test
    logits2, acts2 = cache.get_activations(demo_model, tp.clean_ids, reads)  # memory hit
    cache.clear_memory()
    logits3, acts3 = cache.get_activations(demo_model, tp.clean_ids, reads)  # disk hit
    assert demo_model.forward_calls == first
    torch.testing.assert_close(acts[("head_out", 2)], acts3[("head_out", 2)])
    torch.testing.assert_close(logits, logits3)
    files = list((cache.cache_dir() / "activations").glob("*.safetensors"))
    assert files and all(len(f.stem) == 64 for f in files)  # hashed names, no prompt text
    # different sites -> a different key -> one new forward pass
    cache.get_activations(demo_model, tp.clean_ids, [("mlp_out", 0)])
    assert demo_model.forward_calls == first + 1


def _pair_args():
    return ["--clean", DEMO_PAIR.clean, "--corrupted", DEMO_PAIR.corrupted, "--clean-answer", "Anna",
            "--corrupted-answer", "Tom", "--json", *cli_model_args()]


def test_cli_analysis_commands(capsys, tmp_path):
    from explorer.surfaces.cli import main
    assert main(["dla", *_pair_args()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["error"]) < (tol("check") if HALF else 1e-4 * abs(out["ld_true"]))
    assert main(["lens", *_pair_args()]) == 0
    lens = json.loads(capsys.readouterr().out)
    assert {r["run"] for r in lens["records"]} == {"clean", "corrupted"}
    assert main(["ablate", *_pair_args(), "--targets", "L1H2,mlp0"]) == 0
    abl = json.loads(capsys.readouterr().out)["records"]
    for r in abl:
        assert r["shift"] == pytest.approx(r["ld_ablated"] - r["ld_run"], abs=1e-5)
    assert main(["attribute", *_pair_args(), "--site", "mlp_out", "--exact"]) == 0
    assert -1 <= json.loads(capsys.readouterr().out)["spearman"] <= 1
    card_path = tmp_path / "card.json"
    assert main(["run", "--prompts", str(REPO_ROOT / "prompts" / "demo_induction.jsonl"), "--targets", "L2 attn",
                 "--max-pairs", "20", "--n-random", "2", "--card", str(card_path), "--json", *cli_model_args()]) == 0
    card = json.loads(card_path.read_text())
    assert card["status"] in ("pass", "pass_with_warnings", "fail")
    assert {"tool_version", "model", "dataset", "parameters", "metrics", "thresholds", "warnings", "timestamp"} <= set(card)
    assert card["dataset"]["sha256"] and card["model"]["weight_sha256"]


def test_cli_run_reports_malformed_file(tmp_path, capsys):
    from explorer.surfaces.cli import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n")
    assert main(["run", "--prompts", str(bad), "--targets", "L1 attn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1" in err[0]
