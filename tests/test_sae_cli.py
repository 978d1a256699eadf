"""`python -m explorer sae ...`: every action answers --json, and bad input exits 2 with one line."""
import json

import pytest
import torch

from explorer.sources.sae import SAEConfig, random_sae, save_sae
from explorer.surfaces.cli import main
from tests.conftest import cli_model_args

PAIR = ["--clean", "When Mary and John went to the store , John gave a drink to",
        "--corrupted", "When Mary and John went to the store , Mary gave a drink to",
        "--clean-answer", "Mary", "--corrupted-answer", "John"]


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae")
    save_sae(random_sae(SAEConfig("topk", 128, 64, "blocks.1.hook_resid_post", k=4, model_name="demo"), seed=1),
             folder)
    return str(folder)


def _json(capsys, *args) -> dict:
    assert main(list(args) + cli_model_args() + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sae_actions_answer_json(sae_folder, capsys, tmp_path):
    info = _json(capsys, "sae", "info", "--sae", sae_folder)
    assert info["sae"]["site"] == "resid_post" and info["sae"]["layer"] == 1
    top = _json(capsys, "sae", "top", "--sae", sae_folder, *PAIR)
    assert top["top"] and top["differing_pos"] == 14
    attr = _json(capsys, "sae", "attribute", "--sae", sae_folder, *PAIR, "--exact-top", "2")
    assert len(attr["exact"]) == 2 and "estimate" in attr["cells"][0]
    steer = _json(capsys, "sae", "steer", "--sae", sae_folder, *PAIR, "--latent", "3", "--alpha", "2", "--n-new", "2")
    assert "ld_change" in steer
    health = _json(capsys, "sae", "health", "--sae", sae_folder, *PAIR)
    assert set(health["ld"]) == {"clean", "corrupted"}
    card = _json(capsys, "sae", "card", "--sae", sae_folder, "--latent", "3")
    assert card["logit_effects"] and card["contexts"] == []  # no index beside this SAE
    prompts = tmp_path / "set.jsonl"
    prompts.write_text(json.dumps({"id": "a", "clean": PAIR[1], "corrupted": PAIR[3], "clean_answer": "Mary",
                                   "corrupted_answer": "John"}) + "\n")
    knock = _json(capsys, "sae", "knockdown", "--sae", sae_folder, "--prompts", str(prompts), "--latents", "3",
                  "--n-random", "2")
    assert knock["summary"]["pairs"] == 1


@pytest.mark.parametrize("args,message", [
    (["sae", "info", "--sae", "/no/such/folder"], "does not exist"),
    (["sae", "card", "--latent", "64"], "Latent 64 is out of range"),
    (["sae", "steer", "--latent", "1", "--alpha", "1", "--positions", "x", *PAIR], "--positions must be"),
    (["sae", "knockdown", "--prompts", "/no/set.jsonl", "--latents", "a"], ""),
    (["sae"], "Give an sae action"),
    (["sae", "train", "--layer", "9", "--out", "/tmp/never"], "Layer 9 is out of range"),
])
def test_sae_bad_input_exits_2_with_one_line(sae_folder, args, message, capsys):
    if "--sae" not in args and args[1:2] and args[1] not in ("train",):
        args = args[:2] + ["--sae", sae_folder] + args[2:]
    assert main(args + (cli_model_args() if len(args) > 1 else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err


def test_an_sae_of_another_width_is_refused_naming_both_sizes(tmp_path, capsys):
    save_sae(random_sae(SAEConfig("topk", 576, 64, "blocks.1.hook_resid_post", k=4, model_name="smollm2")), tmp_path)
    assert main(["sae", "info", "--sae", str(tmp_path)] + cli_model_args()) == 2
    err = capsys.readouterr().err
    assert "576" in err and "128" in err and "smollm2" in err
    bad = tmp_path / "nan"
    save_sae(random_sae(SAEConfig("topk", 128, 64, "blocks.1.hook_resid_post", k=4)), bad)
    from safetensors.torch import load_file, save_file
    state = load_file(str(bad / "sae_weights.safetensors"))
    state["b_enc"] = torch.full_like(state["b_enc"], float("nan"))
    save_file(state, str(bad / "sae_weights.safetensors"))
    assert main(["sae", "info", "--sae", str(bad)] + cli_model_args()) == 2
    assert "NaN" in capsys.readouterr().err
