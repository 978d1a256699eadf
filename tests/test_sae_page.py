"""The SAE page in AppTest: every view on the demo model with a local SAELens folder, its numbers equal to the
library's, and bad SAE folders as one message each while the page keeps working."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from explorer.analyses import sae_features as sf
from explorer.sources.sae import SAEConfig, load_sae, random_sae, save_sae
from explorer.surfaces.ui.state import DEMO_PAIR
from tests.test_app import PAGE_NAMES, page

PAGE = "pages/10_SAE.py"
PAGE_NAMES.setdefault(PAGE, "sae")
LOCAL = "A local SAELens folder …"


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    sae = random_sae(SAEConfig("topk", 128, 256, "blocks.1.hook_resid_post", k=8, model_name="demo"), seed=3)
    return str(save_sae(sae, tmp_path_factory.mktemp("sae") / "demo-random"))


def open_sae(folder: str, **query):
    return page(PAGE, sae=LOCAL, folder=folder, **query)


def test_latents_view_shows_the_librarys_latents(demo_model, sae_folder):
    at = open_sae(sae_folder)
    assert not at.exception and not at.error, [e.value for e in at.error]
    ref = sf.pair_latents(demo_model, load_sae(sae_folder), DEMO_PAIR)
    top = at.dataframe[0].value
    clean = ref.top[ref.top["run"] == "clean"].drop(columns="run").reset_index(drop=True)
    assert top.reset_index(drop=True)[["pos", "latent", "activation"]].equals(clean[["pos", "latent", "activation"]])
    assert any("topk SAE at **resid_post** layer **1**" in c.value for c in at.sidebar.caption)


@pytest.mark.parametrize("view", ["Attribution", "Feature card", "Health"])
def test_every_view_opens_without_error(demo_model, sae_folder, view):
    at = open_sae(sae_folder, view=view)
    assert not at.exception and not at.error, [e.value for e in at.error]
    if view == "Health":
        ref = sf.reconstruction_health(demo_model, load_sae(sae_folder), DEMO_PAIR)
        metrics = {m.label: m.value for m in at.metric}
        assert float(metrics["FVU, clean run"]) == pytest.approx(ref.fvu["clean"], abs=1e-3)
    if view == "Attribution":
        ref = sf.latent_attribution(demo_model, load_sae(sae_folder), DEMO_PAIR, exact_top=10)
        shown = at.dataframe[0].value
        assert shown["exact"].tolist() == pytest.approx(ref.exact["exact"].tolist(), abs=1e-5)


def test_knockdown_and_steering_forms(demo_model, sae_folder):
    at = open_sae(sae_folder, view="Knockdown")
    at.text_input(key="w.sae.latents").set_value("5, 9")
    at.number_input(key="w.sae.set_pairs").set_value(4)
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(m.label == "Pairs where it fires" for m in at.metric)
    at = open_sae(sae_folder, view="Steering")
    at.number_input(key="w.sae.alpha").set_value(8.0)
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    ref = sf.steer(demo_model, load_sae(sae_folder), DEMO_PAIR, 0, 8.0)
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["LD steered"]) == pytest.approx(ref.ld_steered, abs=1e-3)
    at.text_input(key="w.sae.steer_positions").set_value("2, x")
    at.button[0].click().run()
    assert not at.exception and len(at.error) == 1 and "Steering positions must be all" in at.error[0].value


def test_bad_sae_folders_are_one_message_each(tmp_path, sae_folder):
    wrong = save_sae(random_sae(SAEConfig("topk", 64, 32, "blocks.1.hook_resid_post", k=4)), tmp_path / "wrong-d-in")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 128, "d_sae": 64,
                                                  "hook_name": "blocks.1.hook_resid_post"}))
    (broken / "sae_weights.safetensors").write_bytes((Path(sae_folder) / "sae_weights.safetensors").read_bytes())
    nan = random_sae(SAEConfig("topk", 128, 64, "blocks.1.hook_resid_post", k=4))
    with torch.no_grad():
        nan.W_dec[0, 0] = float("nan")
    nan_folder = save_sae(nan, tmp_path / "nan")
    for folder, message in [(wrong, "d_in is 64"), (broken, "gated"), (tmp_path / "missing", ""),
                            (nan_folder, "NaN")]:
        at = open_sae(str(folder))
        assert not at.exception, (folder, at.exception)
        assert len(at.error) == 1 and message in at.error[0].value, (folder, [e.value for e in at.error])
        # the sidebar still offers every SAE and the pages' links remain
        assert LOCAL in at.sidebar.selectbox(key="w.sae.sae").options
    at = open_sae(sae_folder, latent="9999", view="Feature card")  # out of range in a URL: the default instead
    assert not at.exception and not at.error
