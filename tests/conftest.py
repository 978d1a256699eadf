import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CIRCUIT_EXPLORER_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["CIRCUIT_EXPLORER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(1)
    yield


_MODELS = {}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> LoadedModel for a random model saved and reloaded from disk."""
    from explorer.models import load_model
    from explorer.tiny import build_tiny_model

    def get(family: str):
        if family not in _MODELS:
            folder = build_tiny_model(family, tmp_path_factory.mktemp(family))
            _MODELS[family] = load_model(str(folder))
        return _MODELS[family]

    return get


@pytest.fixture(scope="session")
def demo_model():
    from explorer.models import load_model
    return load_model("demo")
