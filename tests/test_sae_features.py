"""explorer/analyses/sae_features.py on the demo model, checked against plain-torch forward hooks: the error-term
identity, latent attribution and exact latent patching, knockdown, steering, reconstruction health, the feature
index and the logit effects."""
import random

import pytest
import torch

from explorer.analyses import sae_features as sf
from explorer.core.prompts import tokenize_pair
from explorer.core.runtime import to_host
from explorer.sources import corpus
from explorer.sources.demo.tasks import ioi, set_completion
from explorer.sources.sae import SAEConfig, random_sae
from tests import device_guard
from tests.conftest import TEST_DEVICE, tol

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cpu", reason="plain-torch references run on the CPU")
LAYER, NEVER = 1, 7


@pytest.fixture(scope="module")
def sae():
    s = random_sae(SAEConfig("topk", 128, 256, f"blocks.{LAYER}.hook_resid_post", k=8, model_name="demo"), seed=4)
    with torch.no_grad():
        s.b_enc[NEVER] = -1e4  # never in the top k: a latent that never fires
    return s


@pytest.fixture(scope="module")
def pairs(demo_model):
    rng = random.Random(11)
    return [tokenize_pair(demo_model.tokenizer, gen(rng), demo_model.arch) for gen in (ioi, set_completion, ioi)]


def _plain(t):
    return t.detach().cpu().as_subclass(torch.Tensor).float()


def _ld_with_hook(lm, ids, answers, edit=None):
    """LD from a plain forward of the torch model, `edit(output [1, pos, d]) -> new output` at layer 1's output."""
    model = lm.torch_model
    handle = None
    if edit is not None:
        def hook(module, inputs, output):
            if isinstance(output, tuple):
                return (edit(output[0]),) + tuple(output[1:])
            return edit(output)
        handle = model.model.layers[LAYER].register_forward_hook(hook)
    try:
        with device_guard.paused():
            logits = model(torch.tensor([list(ids)])).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()
    return float(logits[answers[0]] - logits[answers[1]]), _plain(logits)


def _weights(sae):
    return {k: _plain(v) for k, v in sae.state().items()}


def _encode(w, x, k=8):
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())


def test_error_term_identity_no_latent_changed_leaves_the_logits(demo_model, sae, pairs):
    tp = pairs[0]
    _, act = sf._prompt_acts(demo_model, sae, tp.clean_ids)
    z = sf._latents(sae, act)
    spliced = sf.splice(sae, act, z, z)
    logits = sf._run_values(demo_model, sae, tp.clean_ids, spliced[None])[0]
    _, plain = _ld_with_hook(demo_model, tp.clean_ids, (0, 1))
    torch.testing.assert_close(_plain(logits), plain, atol=tol("act"), rtol=0)
    # the splice really went through the SAE: a changed latent moves the logits
    z2 = z.clone()
    z2[3, int(z[3].argmax())] += 5.0
    moved = sf._run_values(demo_model, sae, tp.clean_ids, sf.splice(sae, act, z2, z)[None])[0]
    assert (moved - logits).abs().max() > 1e-3


def test_knockdown_of_a_never_active_latent_changes_nothing(demo_model, sae, pairs):
    res = sf.knockdown(demo_model, sae, pairs, [NEVER], method="zero", n_random=3)
    assert res.summary["pairs_active"] == 0
    assert res.per_pair["drop"].abs().max() <= tol("act")
    mean = sf.knockdown(demo_model, sae, pairs, [NEVER], method="mean", n_random=0)
    assert mean.per_pair["drop"].abs().max() <= tol("act")


def test_knockdown_matches_a_plain_torch_ablation(demo_model, sae, pairs):
    tp = pairs[1]
    _, act = sf._prompt_acts(demo_model, sae, tp.clean_ids)
    z = sf._latents(sae, act)
    target = int(z[1:].sum(0).argmax())
    res = sf.knockdown(demo_model, sae, [tp], [target], n_random=2)
    w = _weights(sae)
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)

    def ablate(out):
        x = out.clone()
        zz = _encode(w, x[0, 1:])
        x[0, 1:] -= zz[:, target:target + 1] * w["W_dec"][target]
        return x
    ld_ablated, _ = _ld_with_hook(demo_model, tp.clean_ids, answers, ablate)
    assert res.per_pair["active"].iloc[0]
    assert res.per_pair["ld_ablated"].iloc[0] == pytest.approx(ld_ablated, abs=tol("ref"))
    assert len(res.random) == 2 and set(res.to_json()) >= {"summary", "per_pair", "random"}


def test_attribution_gradients_and_exact_patching_match_plain_torch(demo_model, sae, pairs):
    tp = pairs[0]
    res = sf.latent_attribution(demo_model, sae, tp, exact_top=3)
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    w = _weights(sae)
    _, act_corr = sf._prompt_acts(demo_model, sae, tp.corrupted_ids)
    act_corr = _plain(act_corr)
    z_corr = _encode(w, act_corr)
    z_corr[0] = 0
    leaf = z_corr.clone().requires_grad_(True)
    error = act_corr - (z_corr @ w["W_dec"] + w["b_dec"])

    def through_latents(out):
        return (leaf @ w["W_dec"] + w["b_dec"] + error)[None]
    with torch.enable_grad():
        with device_guard.paused():
            model = demo_model.torch_model
            handle = model.model.layers[LAYER].register_forward_hook(
                lambda m, i, o: (through_latents(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else through_latents(o))
            try:
                logits = model(torch.tensor([list(tp.corrupted_ids)])).logits[0, -1]
                (logits[answers[0]] - logits[answers[1]]).backward()
            finally:
                handle.remove()
    grad = leaf.grad
    for row in res.cells.head(20).itertuples():
        assert row.grad == pytest.approx(float(grad[row.pos, row.latent]), abs=tol("ref"))
    span = res.ld_clean - res.ld_corrupted
    for row in res.exact.itertuples():
        def patch(out, p=row.pos, i=row.latent, dz=row.z_clean - row.z_corr):
            x = out.clone()
            x[0, p] += dz * w["W_dec"][i]
            return x
        ld, _ = _ld_with_hook(demo_model, tp.corrupted_ids, answers, patch)
        assert row.ld_patched == pytest.approx(ld, abs=tol("ref"))
        assert row.exact == pytest.approx((ld - res.ld_corrupted) / span, abs=tol("ref"))
    assert res.cells["estimate"].abs().sum() > 0


def test_steering_adds_the_decoder_direction(demo_model, sae, pairs):
    tp = pairs[2]
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)
    zero = sf.steer(demo_model, sae, tp, latent=5, alpha=0.0, n_new=2)
    assert zero.ld_change == pytest.approx(0.0, abs=tol("act"))
    assert zero.continuation == zero.continuation_steered
    res = sf.steer(demo_model, sae, tp, latent=5, alpha=8.0, n_new=2)
    direction = _weights(sae)["W_dec"][5] * 8.0

    def add(out):
        x = out.clone()
        x[0, 1:] += direction
        return x
    ld, _ = _ld_with_hook(demo_model, tp.clean_ids, answers, add)
    assert res.ld_steered == pytest.approx(ld, abs=tol("ref"))
    assert set(res.top["steered"]) == {True, False}
    with pytest.raises(Exception, match="out of range"):
        sf.steer(demo_model, sae, tp, latent=5, alpha=1.0, positions=[99])


def test_reconstruction_health_matches_plain_torch(demo_model, sae, pairs):
    tp = pairs[0]
    res = sf.reconstruction_health(demo_model, sae, tp)
    w = _weights(sae)
    answers = (tp.clean_answer_id, tp.corrupted_answer_id)

    def reconstruct(out):
        x = out.clone()
        x[0, 1:] = _encode(w, x[0, 1:]) @ w["W_dec"] + w["b_dec"]
        return x
    ld, _ = _ld_with_hook(demo_model, tp.clean_ids, answers, reconstruct)
    assert res.ld_reconstructed["clean"] == pytest.approx(ld, abs=tol("ref"))
    _, act = sf._prompt_acts(demo_model, sae, tp.clean_ids)
    act = _plain(act)
    recon = _encode(w, act) @ w["W_dec"] + w["b_dec"]
    mean = act[1:].mean(0)
    row = res.per_position[(res.per_position["run"] == "clean") & (res.per_position["pos"] == 2)].iloc[0]
    expected = float((act[2] - recon[2]).pow(2).sum() / (act[2] - mean).pow(2).sum())
    assert row["fvu"] == pytest.approx(expected, rel=1e-4)
    assert len(res.per_position) == 2 * (len(tp.clean_ids) - 1)


def test_pair_latents_top_and_differing(demo_model, sae, pairs):
    tp = pairs[0]
    res = sf.pair_latents(demo_model, sae, tp, top_n=3)
    w = _weights(sae)
    _, act = sf._prompt_acts(demo_model, sae, tp.clean_ids)
    z = _encode(w, _plain(act))
    first = res.top[(res.top["run"] == "clean") & (res.top["pos"] == 1) & (res.top["rank"] == 0)].iloc[0]
    assert first["latent"] == int(z[1].argmax()) and first["activation"] == pytest.approx(float(z[1].max()), rel=1e-5)
    diff = res.differing(tp.differing_positions[0], top=5)
    assert len(diff) and (diff["difference"].abs().diff().dropna() <= 1e-6).all()
    assert res.heatmap([int(first["latent"])]).shape[0] == len(tp.clean_ids)


def test_feature_index_card_and_logit_effects(demo_model, sae, tmp_path):
    name = corpus.prepare_demo(demo_model.tokenizer, n_per_task=40, seed=5)
    held = corpus.load(name, "heldout")
    index = sf.build_feature_index(demo_model, sae, held, n_tokens=400, context=64, batch=16, n_top=5)
    assert index.counts.sum() == pytest.approx(index.l0 * index.n_counted)
    assert int(index.counts[NEVER]) == 0
    index.save(tmp_path)
    again = sf.load_feature_index(tmp_path)
    assert torch.equal(again.counts, index.counts) and again.meta["fvu"] == index.meta["fvu"]
    latent = int(index.counts.argmax())
    card = sf.feature_card(demo_model, sae, latent, index=again, n_contexts=3)
    assert card.frequency == pytest.approx(float(index.counts[latent]) / index.n_counted)
    tops = card.contexts[card.contexts["is_top"]]
    assert len(tops) == 3
    assert tops["activation"].iloc[0] == pytest.approx(float(again.top_values[latent, 0]), rel=2e-3)  # float16
    assert card.histogram["count"].sum() == int(index.counts[latent])
    # logit effects: the decoder row through the final RMSNorm's gain and the unembedding
    w = _weights(sae)
    gain = _plain(demo_model.torch_model.model.norm.weight)
    W_U = _plain(demo_model.torch_model.lm_head.weight)
    logits = W_U @ (gain * w["W_dec"][latent])
    top = card.logit_effects[card.logit_effects["direction"] == "promoted"].iloc[0]
    assert top["token_id"] == int(logits.argmax()) and top["logit"] == pytest.approx(float(logits.max()), rel=1e-4)
    assert set(card.to_json()) >= {"contexts", "histogram", "logit_effects", "frequency"}


def test_shipped_saes_load_fit_and_carry_cards(demo_model):
    import json

    from explorer.sources.sae import SHIPPED_DIR, resolve_sae, shipped_saes
    shipped = shipped_saes()
    assert "demo-resid_post-1" in [s["name"] for s in shipped]
    for entry in shipped:
        folder = SHIPPED_DIR / entry["name"]
        size = sum(f.stat().st_size for f in folder.iterdir())
        assert size <= 40 * 2**20 and (folder / "sae_weights.safetensors").stat().st_size <= 20 * 2**20
        card = json.loads((folder / "card.json").read_text())
        assert {"fvu", "ce_loss_recovered", "dead_fraction", "l0"} <= set(card["heldout"])
        assert card["command"].startswith("python -m explorer sae train")
    sae = resolve_sae("demo-resid_post-1")
    assert sae.cfg.site == ("resid_post", 1) and sf.check_fits(sae, demo_model) == []
    index = sf.load_feature_index(sae.folder)
    assert index.meta["model"] == "demo" and index.top_tokens.shape[0] == sae.d_sae
