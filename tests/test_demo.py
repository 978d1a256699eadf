"""The bundled demo model: tokenizer round trip, model-card numbers, tasks, determinism."""
import hashlib
import json
import random

import pytest

from explorer.sources.demo import tasks
from explorer.surfaces.demo_card import measure
from explorer.sources.demo.train import is_held_out, train
from explorer.sources.models import DEMO_MODEL_DIR
from explorer.core.prompts import load_prompt_set, tokenize_pair
from explorer.core.runtime import REPO_ROOT
from tests.conftest import fp32_only


def test_word_level_tokenizer_survives_the_loader(demo_model):
    # AutoTokenizer would return Qwen2's BPE tokenizer for a qwen2 config; the loader must not.
    tok = demo_model.tokenizer
    assert len(tok) == demo_model.arch.vocab_size
    ids = tok("Man has four fruits , Peach")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "Man", "has", "four", "fruits", ",", "Peach"]
    assert tok.decode(tok.encode("Mango", add_special_tokens=False)) == "Mango"


@fp32_only  # the card's numbers were measured in float32, to 1e-3
def test_model_card_numbers_reproduce(demo_model):
    card = json.loads((DEMO_MODEL_DIR / "card.json").read_text())
    fresh = measure(demo_model)
    assert fresh["weights_sha256"] == card["weights_sha256"]
    assert card["weights_sha256"] == hashlib.sha256((DEMO_MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()
    for task, expected in card["families"].items():
        got = fresh["families"][task]
        assert got["pairs"] == expected["pairs"] >= 100
        assert got["accuracy"] == expected["accuracy"] >= 0.97
        assert got["mean_ld_clean"] == pytest.approx(expected["mean_ld_clean"], abs=1e-3)
        assert got["mean_ld_corrupted"] == pytest.approx(expected["mean_ld_corrupted"], abs=1e-3)
        for a, b in zip(got["residual_patching"], expected["residual_patching"]):
            assert a["last_pos"] == pytest.approx(b["last_pos"], abs=1e-3)


def test_bundled_sets_are_held_out_and_well_formed(demo_model):
    for task in tasks.GENERATORS:
        ps = load_prompt_set(REPO_ROOT / "prompts" / f"demo_{task}.jsonl")
        assert not ps.errors
        assert len(ps.by_category("headline")) >= 100 and len(ps.by_category("control")) >= 10
        for pair in ps.by_category("headline"):
            assert is_held_out(pair.clean) and is_held_out(pair.corrupted)
        for pair in ps.pairs:
            tp = tokenize_pair(demo_model.tokenizer, pair)  # raises if an answer is not one token
            assert tp.same_length and tp.clean_answer_id != tp.corrupted_answer_id


def test_fresh_pairs_not_in_training_are_solved(demo_model):
    """Newly generated held-out pairs (a seed the bundled sets did not use)."""
    from explorer.analyses.dataset import pair_baselines
    from explorer.sources.demo.prompt_sets import held_out_pairs
    for task in ("set_completion", "ioi", "induction"):
        pairs = held_out_pairs(task, 30, seed=12345)
        frame = pair_baselines(demo_model, pairs)
        acc = (frame["clean_top1_correct"].mean() + frame["corrupted_top1_correct"].mean()) / 2
        assert acc >= 0.97, task


@pytest.mark.parametrize("task", list(tasks.GENERATORS))
def test_generators_are_deterministic_and_flip_the_answer(task):
    a = tasks.make_pairs(task, 20, seed=3)
    assert a == tasks.make_pairs(task, 20, seed=3)
    for pair in a:
        assert pair.clean != pair.corrupted and pair.clean_answer != pair.corrupted_answer
        assert len(pair.clean.split()) == len(pair.corrupted.split())
        assert set(pair.clean.split()) | {pair.clean_answer} <= set(tasks.vocabulary())


def test_set_completion_answer_is_the_uncounted_item():
    rng = random.Random(0)
    for _ in range(50):
        pair = tasks.set_completion(rng)
        declared, counted = pair.clean.split(" - ")
        items = [w for w in declared.split()[4:] if w not in (",", "and")]
        seen = [w for w in counted.split() if w in tasks.FRUITS]
        assert set(items) - set(seen) == {pair.clean_answer}


def test_training_is_deterministic(tmp_path):
    """Same seed -> identical weights (a short run; the full run is `python -m explorer.sources.demo.train`)."""
    h1 = train(tmp_path / "a", steps=8, batch=8, log_every=1000)
    h2 = train(tmp_path / "b", steps=8, batch=8, log_every=1000)
    assert h1 == h2
    assert train(tmp_path / "c", steps=8, batch=8, seed=1, log_every=1000) != h1
