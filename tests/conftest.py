"""Fixtures, the device/dtype switch and per-dtype tolerances.

CIRCUIT_EXPLORER_TEST_DEVICE=cpu|cuda|cuda:N|mps and CIRCUIT_EXPLORER_TEST_DTYPE=float32|bfloat16|float16
load every test model there (default cpu, float32). Reference computations stay on the CPU in
float32/float64 or run on the same model and device; `tol(kind)` says how close they must be.
CIRCUIT_EXPLORER_DEVICE_GUARD=0|1 turns the CPU-side device guard (tests/device_guard.py) off or on;
it is on by default when the tests run on the CPU.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CIRCUIT_EXPLORER_THREADS", "1")
# The scheduler's choices (and so the pass counts some tests assert) must not depend on a timing probe.
os.environ.setdefault("CIRCUIT_EXPLORER_PASS_COSTS", "constants")

from tests import device_guard  # noqa: E402  (needs ROOT on the path)

TEST_DEVICE = os.environ.get("CIRCUIT_EXPLORER_TEST_DEVICE", "cpu")
TEST_DTYPE = os.environ.get("CIRCUIT_EXPLORER_TEST_DTYPE", "float32")
GUARD = os.environ.get("CIRCUIT_EXPLORER_DEVICE_GUARD", "1" if TEST_DEVICE == "cpu" else "0") == "1"
HALF = TEST_DTYPE in ("bfloat16", "float16")

# Absolute tolerances per dtype, for the kinds of comparison the suite makes:
#  same  - one computation taken two ways inside the library (chunked, packed, cached, fast/plain path);
#  ref   - a logit difference against an independent plain-torch computation on the same model;
#  wide  - the model in the test dtype against a plain-transformers float32 reference on the CPU;
#  act   - activations or logits against plain-torch hooks on the same model (also used as rtol);
#  check - numerical identities of the library's own outputs (DLA sums, norm linearisation, recovery 1).
# A test may state a tighter float32 value of its own (fp32=); half precision always uses the table.
TOLERANCES = {
    "float32": {"same": 2e-5, "ref": 1e-4, "wide": 1e-4, "act": 1e-5, "check": 1e-5},
    "bfloat16": {"same": 0.05, "ref": 0.15, "wide": 0.5, "act": 0.02, "check": 0.05},
    "float16": {"same": 0.01, "ref": 0.02, "wide": 0.1, "act": 0.005, "check": 0.01},
}


def tol(kind: str, fp32: float | None = None) -> float:
    """The absolute tolerance for a comparison of `kind` in the test dtype."""
    if fp32 is not None and TEST_DTYPE == "float32":
        return fp32
    return TOLERANCES[TEST_DTYPE][kind]


fp32_only = pytest.mark.skipif(HALF, reason=f"checks numbers to float32 precision; the suite runs in {TEST_DTYPE}")


def load_test_model(path: str, **kwargs):
    """load_model on the test device in the test dtype (keywords override them)."""
    from explorer.sources.models import load_model
    return load_model(path, **{"device": TEST_DEVICE, "dtype": TEST_DTYPE, **kwargs})


def cli_model_args() -> list[str]:
    """The command line's --device and --dtype for the test device and dtype."""
    return ["--device", TEST_DEVICE, "--dtype", TEST_DTYPE]


def model_ids(lm, ids) -> torch.Tensor:
    """Token ids [batch, pos] (a flat list: one row) on the model's device, for plain-torch references."""
    from explorer.core.runtime import to_model
    rows = [list(ids)] if not isinstance(ids[0], (list, tuple)) else [list(r) for r in ids]
    return to_model(lm, torch.tensor(rows))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["CIRCUIT_EXPLORER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def _device_guard():
    if not GUARD:
        yield
        return
    with device_guard.guarded():
        yield


@pytest.fixture(autouse=True)
def _guard_late_imports(_device_guard):
    if device_guard.ACTIVE:
        device_guard.watch_modules()  # test modules and explorer.surfaces.ui imported since the session began


_MODELS = {}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> LoadedModel for a random model saved and reloaded from disk."""
    from explorer.sources.tiny import build_tiny_model

    def get(family: str):
        if family not in _MODELS:
            folder = build_tiny_model(family, tmp_path_factory.mktemp(family))
            _MODELS[family] = load_test_model(str(folder))
        return _MODELS[family]

    return get


@pytest.fixture(scope="session")
def demo_model():
    return load_test_model("demo")
