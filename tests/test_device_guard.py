"""The CPU-side device guard: it fires on each device mistake the GPU run found, and not on the fixes."""
import pytest
import torch

from explorer.core import engine
from explorer.core.cache import get_activations
from explorer.analyses.dla import head_contributions
from explorer.core.runtime import HOST, to_host, to_model
from tests import device_guard
from tests.conftest import GUARD, ROOT, model_ids
from tests.device_guard import DeviceGuardError, guarded, is_host


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A CPU float32 model whatever the test device: the guard emulates the second device on the CPU."""
    from explorer.sources.models import load_model
    from explorer.sources.tiny import build_tiny_model
    return load_model(str(build_tiny_model("llama", tmp_path_factory.mktemp("guard"))), device="cpu")


def library_function(source: str, name: str):
    """A function compiled as if it lived in explorer/, seeing the `torch` explorer's modules see."""
    from explorer.core import runtime
    scope = {"torch": runtime.torch, "HOST": HOST, "to_model": to_model, "to_host": to_host, "engine": engine}
    exec(compile(source, str(ROOT / "explorer" / "guard_probe.py"), "exec"), scope)
    return scope[name]


def test_the_suite_runs_guarded_on_the_cpu():
    assert device_guard.ACTIVE == GUARD


def test_tensor_factory_without_a_device_in_the_library(lm):
    """The old pattern: ids built on the implicit device and handed to the model."""
    with guarded():
        old = library_function("def ids(lm, seq):\n    return torch.tensor([list(seq)])\n", "ids")
        new = library_function("def ids(lm, seq):\n    return to_model(lm, torch.tensor([list(seq)], device=HOST))\n",
                               "ids")
        with pytest.raises(DeviceGuardError, match=r"tensor\(\) without device= at explorer/guard_probe.py:2"):
            old(lm, [3, 4, 5])
        with torch.no_grad():
            lm.torch_model(new(lm, [3, 4, 5]))


def test_cached_activations_meet_the_weights_only_through_to_model(lm):
    """The old DLA and path-patching pattern: CPU-cached activations times weights on the device."""
    with guarded():
        old = library_function("def contributions(z, w):\n    return torch.einsum('hd,mhd->hm', z.float(), "
                               "w.view(w.shape[0], z.shape[0], -1))\n", "contributions")
        _, acts = get_activations(lm, (3, 4, 5, 6), [("head_out", 1)])
        z = acts[("head_out", 1)][-1]  # [head, d_head] on the host
        assert is_host(z) and z.dtype == torch.float32
        w = lm.sites.o_proj(lm.torch_model, 1).weight.detach().float()
        with pytest.raises(DeviceGuardError, match="einsum at explorer/guard_probe.py:2 mixes a host tensor"):
            old(z, w)
        assert head_contributions(lm, 1, z).shape == (lm.arch.n_heads, lm.arch.d_model)


def test_the_engine_moves_what_it_is_given(lm, monkeypatch):
    """Ids, intervention indices and values and the skip value may come from the host (path patching
    fed the old engine the CPU-cached residual as its skip value); a value written without the
    engine's move is caught."""
    with guarded():
        ids = torch.tensor([[3, 4, 5, 6]])
        value = torch.zeros(1, lm.arch.d_model)
        iv = engine.Intervention("resid_post", 1, torch.tensor([0]), torch.tensor([2]), value)
        skip = get_activations(lm, (3, 4, 5, 6), [("resid_post", 0)])[1][("resid_post", 0)][None]
        assert is_host(skip)
        out = engine.run(lm, ids, [iv], reads=[("mlp_out", 1)], options=engine.PassOptions(skip_layers=1, skip_value=skip))
        logits, reads = out.logits, out.reads
        assert is_host(logits) and logits.dtype == torch.float32
        assert not is_host(reads[("mlp_out", 1)])  # reads stay on the device for the next pass
        monkeypatch.setattr(engine, "_on_model", lambda lm, iv: iv)
        with pytest.raises(DeviceGuardError, match="writes a host tensor into a tensor on the model's device"):
            engine.run(lm, ids, [iv])


def test_results_are_read_on_the_host_only(lm):
    with guarded():
        on_device = to_model(lm, torch.tensor([1.0, 2.0], device=HOST))
        with pytest.raises(DeviceGuardError, match="numpy at tests/test_device_guard.py"):
            on_device.numpy()
        assert to_host(on_device).numpy().tolist() == [1.0, 2.0]


def test_test_references_run_on_the_models_device(lm):
    """Plain-torch references in tests feed the model ids on its device (model_ids), as a GPU needs."""
    with guarded(), torch.no_grad():
        with pytest.raises(DeviceGuardError, match="embedding at tests/test_device_guard.py"):
            lm.torch_model(torch.tensor([[3, 4, 5]]))
        lm.torch_model(model_ids(lm, [3, 4, 5]))


def test_cpu_scalars_and_cpu_indices_are_allowed_as_on_cuda(lm):
    with guarded():
        x = to_model(lm, torch.arange(6.0, device=HOST))
        assert float((x * torch.tensor(2.0))[1]) == 2.0  # a 0-dim CPU tensor mixes with any device
        assert x[torch.tensor([1, 3])].tolist() == [1.0, 3.0]  # CPU indices select on any device
        x[torch.tensor([0])] = to_model(lm, torch.tensor([9.0]))
        with pytest.raises(DeviceGuardError):
            x + torch.ones(6)
