"""explorer/sources/sae.py: the SAELens folder format, checked against the sae-lens package itself, the hook
names every spelling maps to, and one clear message per bad input."""
import json

import pytest
import torch
from safetensors.torch import save_file

from explorer.core.errors import ExplorerInputError
from tests import device_guard
from explorer.sources.sae import (SAEConfig, check_fits, hook_to_site, load_sae, random_sae, resolve_sae,
                                  save_sae)


def _cfg(arch: str, d_in: int = 16, d_sae: int = 48, hook: str = "blocks.1.hook_resid_post") -> SAEConfig:
    return SAEConfig(arch, d_in, d_sae, hook, k=6 if arch == "topk" else None, model_name="demo", context_size=64)


def _x(d_in: int = 16) -> torch.Tensor:
    return torch.randn(3, 5, d_in, generator=torch.Generator().manual_seed(1)) * 2


def _lens():
    pytest.importorskip("sae_lens")
    import warnings
    warnings.filterwarnings("ignore")
    from sae_lens import SAE
    return SAE


def plain(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor to compare (sae-lens computes on the CPU, beside the device guard's emulation)."""
    return t.detach().cpu().as_subclass(torch.Tensor)


@pytest.fixture
def unguarded():
    with device_guard.paused():
        yield


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_our_save_loads_in_sae_lens_with_the_same_encode_and_decode(arch, tmp_path, unguarded):
    LensSAE = _lens()
    ours = random_sae(_cfg(arch), seed=3, threshold=0.1)
    save_sae(ours, tmp_path)
    theirs = LensSAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.architecture() == arch
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "demo" and theirs.cfg.metadata.context_size == 64
    x = _x()
    z = ours.encode(x)
    assert (z > 0).any()
    torch.testing.assert_close(plain(theirs.encode(x)), plain(z), atol=1e-5, rtol=0)
    torch.testing.assert_close(plain(theirs.decode(z)), plain(ours.decode(z)), atol=1e-5, rtol=0)
    # and back: our loader reads what we wrote identically
    again = load_sae(tmp_path)
    torch.testing.assert_close(plain(again.encode(x)), plain(z), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_a_sae_lens_saved_sae_loads_here(arch, tmp_path, unguarded):
    LensSAE = _lens()
    cfg = {"architecture": arch, "d_in": 16, "d_sae": 40, "dtype": "float32", "device": "cpu",
           "metadata": {"hook_name": "blocks.2.hook_mlp_out", "model_name": "gpt2"}}
    if arch == "topk":
        cfg["k"] = 5
    theirs = LensSAE.from_dict(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if arch == "jumprelu":
            theirs.threshold.copy_(torch.rand_like(theirs.threshold) * 0.2)
    theirs.save_model(str(tmp_path))
    ours = load_sae(tmp_path)
    assert ours.cfg.site == ("mlp_out", 2) and ours.cfg.architecture == arch
    x = _x()
    torch.testing.assert_close(plain(ours.encode(x)), plain(theirs.encode(x)), atol=1e-5, rtol=0)
    z = ours.encode(x)
    torch.testing.assert_close(plain(ours.decode(z)), plain(theirs.decode(z)), atol=1e-5, rtol=0)


def test_old_flat_format_reads_like_sae_lens_reads_it(tmp_path, unguarded):
    LensSAE = _lens()
    ref = random_sae(_cfg("topk", d_sae=32), seed=5)
    save_file({k: v.contiguous() for k, v in ref.state().items()}, str(tmp_path / "sae_weights.safetensors"))
    flat = {"d_in": 16, "d_sae": 32, "hook_point": "blocks.1.hook_resid_post", "hook_point_layer": 1,
            "model_name": "demo", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6},
            "normalize_activations": False, "apply_b_dec_to_input": True, "dtype": "float32", "device": "cpu",
            "context_size": 64, "sae_lens_training_version": "3.0.0"}
    (tmp_path / "cfg.json").write_text(json.dumps(flat))
    ours = load_sae(tmp_path)
    theirs = LensSAE.load_from_disk(str(tmp_path))
    assert ours.cfg.architecture == "topk" and ours.cfg.k == 6 and ours.cfg.site == ("resid_post", 1)
    x = _x()
    torch.testing.assert_close(plain(ours.encode(x)), plain(theirs.encode(x)), atol=1e-5, rtol=0)


def test_half_precision_weights_and_sparsity_round_trip(tmp_path):
    sae = random_sae(_cfg("topk"), seed=2)
    save_sae(sae, tmp_path, dtype="float16", sparsity=torch.full((48,), -2.0))
    back = load_sae(tmp_path)
    assert back.W_enc.dtype == torch.float32  # widened on load
    torch.testing.assert_close(plain(back.W_dec), plain(sae.W_dec).half().float())
    assert back.sparsity.shape == (48,) and float(back.sparsity[0]) == -2.0


@pytest.mark.parametrize("hook,site", [
    ("blocks.14.hook_resid_post", ("resid_post", 14)), ("blocks.0.hook_resid_pre", ("resid_pre", 0)),
    ("blocks.3.hook_attn_out", ("attn_out", 3)), ("blocks.3.hook_mlp_out", ("mlp_out", 3)),
    ("model.layers.14", ("resid_post", 14)), ("model.layers.2.mlp", ("mlp_out", 2)),
    ("model.layers.2.self_attn", ("attn_out", 2)), ("transformer.h.5", ("resid_post", 5)),
    ("resid_post.7", ("resid_post", 7)), ("mlp_out:1", ("mlp_out", 1)), ("layers_output.4", ("resid_post", 4)),
])
def test_hook_names_in_every_spelling_map_to_sites(hook, site):
    assert hook_to_site(hook) == site


@pytest.mark.parametrize("hook,words", [
    ("blocks.3.hook_resid_mid", "resid_mid"), ("blocks.3.attn.hook_z", "hook_z"),
    ("blocks.3.hook_q", "names no site"), ("nonsense", "names no site"), ("head_out.3", "needs one of"),
])
def test_hooks_without_a_site_are_refused_by_name(hook, words):
    with pytest.raises(ExplorerInputError, match=words):
        hook_to_site(hook)


def _folder(tmp_path, cfg: dict | None = None, tensors: dict | None = None):
    sae = random_sae(_cfg("topk"), seed=0)
    save_sae(sae, tmp_path)
    if cfg is not None:
        base = json.loads((tmp_path / "cfg.json").read_text())
        base.update(cfg)
        (tmp_path / "cfg.json").write_text(json.dumps(base))
    if tensors is not None:
        state = {**sae.state(), **tensors}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sae_weights.safetensors"))
    return tmp_path


@pytest.mark.parametrize("change,words", [
    ({"architecture": "gated"}, "'gated'.*not supported"),
    ({"architecture": "matryoshka_batchtopk"}, "Matryoshka"),
    ({"architecture": "mystery"}, "unknown architecture 'mystery'"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm' is not supported"),
    ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
    ({"k": 0}, "positive integer k"),
    ({"d_in": 99}, r"W_enc has shape \[16, 48\].*d_in 99"),
    ({"reshape_activations": "hook_z"}, "reshape_activations"),
])
def test_bad_configs_are_one_clear_message(tmp_path, change, words):
    with pytest.raises(ExplorerInputError, match=words):
        load_sae(_folder(tmp_path, cfg=change))


def test_bad_folders_and_weights_are_one_clear_message(tmp_path):
    with pytest.raises(ExplorerInputError, match="does not exist"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExplorerInputError, match="no cfg.json"):
        load_sae(tmp_path / "empty")
    pickled = _folder(tmp_path / "pickled")
    (pickled / "sae_weights.safetensors").unlink()
    (pickled / "sae_weights.pt").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(ExplorerInputError, match="pickled weights are never loaded"):
        load_sae(pickled)
    garbage = _folder(tmp_path / "garbage")
    (garbage / "sae_weights.safetensors").write_bytes(b"this is not safetensors")
    with pytest.raises(ExplorerInputError, match="not a readable safetensors"):
        load_sae(garbage)
    nan = _folder(tmp_path / "nan", tensors={"W_dec": torch.full((48, 16), float("nan"))})
    with pytest.raises(ExplorerInputError, match="NaN"):
        load_sae(nan)
    missing = _folder(tmp_path / "missing_tensor")
    state = {k: v for k, v in random_sae(_cfg("topk")).state().items() if k != "b_enc"}
    save_file(state, str(missing / "sae_weights.safetensors"))
    with pytest.raises(ExplorerInputError, match="no tensor 'b_enc'"):
        load_sae(missing)
    bad_json = _folder(tmp_path / "bad_json")
    (bad_json / "cfg.json").write_text("{not json")
    with pytest.raises(ExplorerInputError, match="not valid JSON"):
        load_sae(bad_json)
    with pytest.raises(ExplorerInputError, match="No SAE named"):
        resolve_sae("no-such-sae")


def test_an_sae_for_another_model_or_latent_out_of_range(demo_model):
    wide = random_sae(_cfg("topk", d_in=576, hook="blocks.1.hook_resid_post"))
    with pytest.raises(ExplorerInputError, match="d_in is 576.*has 128 dimensions"):
        check_fits(wide, demo_model)
    deep = random_sae(_cfg("topk", d_in=128, hook="blocks.20.hook_resid_post"))
    with pytest.raises(ExplorerInputError, match="layer 20.*layers 0..3"):
        check_fits(deep, demo_model)
    fits = random_sae(_cfg("topk", d_in=128))
    assert check_fits(fits, demo_model) == []
    with pytest.raises(ExplorerInputError, match="Latent 48 is out of range"):
        fits.check_latent(48)


def test_spliced_positions_leave_out_position_zero_and_massive_activations():
    from explorer.sources.sae import spliced_positions
    act = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(0))
    act[:, 0] *= 1000  # the attention sink
    act[1, 4] *= 500  # a later massive activation
    keep = spliced_positions(act)
    assert not keep[:, 0].any() and not keep[1, 4]
    assert keep[0, 1:].all() and keep[1, [1, 2, 3, 5, 6, 7, 8]].all()
