"""Prompt pairs: the clean/corrupted contrast every experiment starts from.

Holds the JSONL prompt-set format (DESIGN.md), the single-token answer check and
the token table that marks positions where the two prompts differ.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, asdict
from pathlib import Path

import torch

from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import HOST

REQUIRED_FIELDS = ("clean", "corrupted", "clean_answer", "corrupted_answer")
CATEGORIES = ("headline", "control")


@dataclass(frozen=True)
class PromptPair:
    clean: str
    corrupted: str
    clean_answer: str
    corrupted_answer: str
    id: str = "pair"
    category: str = "headline"
    task: str = ""
    notes: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenizedPair:
    """A prompt pair turned into token ids for one tokenizer."""

    pair: PromptPair
    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    clean_answer_id: int
    corrupted_answer_id: int
    clean_tokens: tuple[str, ...]
    corrupted_tokens: tuple[str, ...]

    @property
    def same_length(self) -> bool:
        return len(self.clean_ids) == len(self.corrupted_ids)

    @property
    def n_pos(self) -> int:
        return len(self.clean_ids)

    @property
    def differing_positions(self) -> list[int]:
        """Positions whose input token differs (only meaningful for equal lengths)."""
        return [i for i, (a, b) in enumerate(zip(self.clean_ids, self.corrupted_ids)) if a != b]

    def clean_tensor(self) -> torch.Tensor:  # [1, pos]
        return torch.tensor([self.clean_ids], dtype=torch.long, device=HOST)

    def corrupted_tensor(self) -> torch.Tensor:  # [1, pos]
        return torch.tensor([self.corrupted_ids], dtype=torch.long, device=HOST)

    def require_same_length(self, what: str) -> None:
        if not self.same_length:
            raise ExplorerInputError(
                f"{what} needs the clean and corrupted prompts to have the same number of tokens "
                f"(clean: {len(self.clean_ids)}, corrupted: {len(self.corrupted_ids)}). "
                "Edit the prompts to line up token by token, or use last-position patching only."
            )

    def token_table(self):
        """pandas frame: one row per position, clean/corrupted token, `differs` flag."""
        import pandas as pd

        n = max(len(self.clean_ids), len(self.corrupted_ids))
        rows = []
        for pos in range(n):
            clean = self.clean_tokens[pos] if pos < len(self.clean_tokens) else ""
            corr = self.corrupted_tokens[pos] if pos < len(self.corrupted_tokens) else ""
            differs = (pos >= len(self.clean_ids) or pos >= len(self.corrupted_ids)
                       or self.clean_ids[pos] != self.corrupted_ids[pos])
            rows.append({"pos": pos, "clean_token": clean, "corrupted_token": corr, "differs": differs})
        return pd.DataFrame(rows)

    def position_labels(self) -> list[str]:
        """Axis labels like '3:Mary' or '3:Mary/John' where the tokens differ."""
        labels = []
        for pos, clean in enumerate(self.clean_tokens):
            corr = self.corrupted_tokens[pos] if pos < len(self.corrupted_tokens) else ""
            labels.append(f"{pos}:{clean}" if clean == corr else f"{pos}:{clean}/{corr} *")
        return labels


def show_token(tokenizer, token_id: int) -> str:
    """A readable form of one token; leading spaces shown as '␣' so they are not lost."""
    text = tokenizer.decode([token_id])
    return text.replace(" ", "␣").replace("\n", "\\n")


def answer_token_id(tokenizer, answer: str, which: str) -> int:
    """The single token id of `answer`, or an error that shows how it tokenizes."""
    label = which if which.endswith("token") else f"{which} answer"
    if not answer:
        raise ExplorerInputError(f"The {label} is empty; give the one token the model should predict.")
    ids = tokenizer.encode(answer, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and ids[0] == unk and answer.strip() != tokenizer.unk_token:
        raise ExplorerInputError(f"The {label} {answer!r} is not in this model's vocabulary (it would be read as "
                                 f"{tokenizer.unk_token!r}): pick a word the model knows.")
    if len(ids) == 1:
        return ids[0]
    pieces = " | ".join(repr(tokenizer.decode([i])) for i in ids) or "(nothing)"
    hint = ""
    if not answer.startswith(" "):
        alt = tokenizer.encode(" " + answer, add_special_tokens=False)
        if len(alt) == 1:
            hint = f" Try {(' ' + answer)!r} with a leading space: that is one token."
    raise ExplorerInputError(
        f"The {label} {answer!r} is {len(ids)} tokens, not one: {pieces}. It must be a single token.{hint}"
    )


def single_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Ids of a user's token list (e.g. all fruits), each required to be one token."""
    if not tokens:
        raise ExplorerInputError("The token list is empty.")
    return [answer_token_id(tokenizer, t, "listed token") for t in tokens]


def prompt_ids(tokenizer, text: str, name: str) -> tuple[int, ...]:
    """Token ids of a prompt; words the tokenizer can only map to its unknown token are an error
    (a word-level vocabulary, like the demo model's, would otherwise run on <unk> silently)."""
    if not text.strip():
        raise ExplorerInputError(f"The {name} prompt is empty; type a prompt.")
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = {getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    if unk is None or unk in specials:
        return tuple(tokenizer(text)["input_ids"])
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids = tuple(encoded["input_ids"])
    unknown = [text[a:b] for i, (a, b) in zip(ids, encoded["offset_mapping"]) if i == unk]
    if unknown:
        raise ExplorerInputError(
            f"The {name} prompt has {len(unknown)} word(s) this model's vocabulary does not know: "
            f"{', '.join(repr(w) for w in unknown[:8])}. Use words the model knows (it would read them as "
            f"{tokenizer.unk_token!r}).")
    return ids


def tokenize_pair(tokenizer, pair: PromptPair, arch=None) -> TokenizedPair:
    """Token ids of both prompts and answers, checked: non-empty prompts the vocabulary knows,
    single-token answers that differ, and (given the model's `arch`) prompts within its context."""
    clean_ids = prompt_ids(tokenizer, pair.clean, "clean")
    corrupted_ids = prompt_ids(tokenizer, pair.corrupted, "corrupted")
    if arch is not None:
        arch.check_prompt_length(len(clean_ids), "clean")
        arch.check_prompt_length(len(corrupted_ids), "corrupted")
    clean_answer_id = answer_token_id(tokenizer, pair.clean_answer, "clean")
    corrupted_answer_id = answer_token_id(tokenizer, pair.corrupted_answer, "corrupted")
    if clean_answer_id == corrupted_answer_id:
        raise ExplorerInputError(
            f"The clean and corrupted answers are the same token ({show_token(tokenizer, clean_answer_id)!r}), so "
            "LD is 0 on every run and recovery is 0/0: give the corrupted run a different answer.")
    return TokenizedPair(
        pair=pair,
        clean_ids=clean_ids,
        corrupted_ids=corrupted_ids,
        clean_answer_id=clean_answer_id,
        corrupted_answer_id=corrupted_answer_id,
        clean_tokens=tuple(show_token(tokenizer, i) for i in clean_ids),
        corrupted_tokens=tuple(show_token(tokenizer, i) for i in corrupted_ids),
    )


@dataclass
class PromptSet:
    """Pairs loaded from a JSONL file, with the lines that could not be read."""

    pairs: list[PromptPair]
    errors: list[str] = field(default_factory=list)
    path: str | None = None
    sha256: str | None = None

    def by_category(self, category: str) -> list[PromptPair]:
        return [p for p in self.pairs if p.category == category]

    @property
    def tasks(self) -> list[str]:
        return sorted({p.task for p in self.pairs})


def check_for_tokenizer(prompt_set: PromptSet, tokenizer) -> PromptSet:
    """Keep the pairs whose answers are single tokens for this model; report the others by id."""
    ok, errors = [], list(prompt_set.errors)
    for pair in prompt_set.pairs:
        try:
            tokenize_pair(tokenizer, pair)
        except ExplorerInputError as exc:
            errors.append(f"pair {pair.id}: {exc}")
            continue
        ok.append(pair)
    return PromptSet(pairs=ok, errors=errors, path=prompt_set.path, sha256=prompt_set.sha256)


def parse_pair(record: object, default_id: str) -> PromptPair:
    if not isinstance(record, dict):
        raise ExplorerInputError("expected a JSON object")
    missing = [f for f in REQUIRED_FIELDS if not isinstance(record.get(f), str) or record.get(f) == ""]
    if missing:
        raise ExplorerInputError(f"missing or empty field(s): {', '.join(missing)}")
    category = record.get("category", "headline")
    if category not in CATEGORIES:
        raise ExplorerInputError(f"category must be 'headline' or 'control', not {category!r}")
    return PromptPair(
        id=str(record.get("id", default_id)),
        clean=record["clean"],
        corrupted=record["corrupted"],
        clean_answer=record["clean_answer"],
        corrupted_answer=record["corrupted_answer"],
        category=category,
        task=str(record.get("task", "")),
        notes=str(record.get("notes", "")),
    )


# Uploads are read whole into memory and each pair is tokenized, so both have a ceiling far beyond any
# study: 20 MB, and 200k lines (blank ones too, so 20 MB of newlines is not 20 million steps).
# A flood of bad lines is summarised, not listed.
MAX_PROMPT_SET_BYTES = 20 * 1024 * 1024
MAX_PROMPT_SET_LINES = 200_000
MAX_REPORTED_ERRORS = 50


def _too_big(size: int, what: str) -> ExplorerInputError:
    return ExplorerInputError(f"{what} is {size / 1e6:.1f} MB; prompt sets are limited to "
                              f"{MAX_PROMPT_SET_BYTES / 1e6:.0f} MB. Split it into smaller files.")


def _lines(text: str):
    """Lines of `text` one at a time: str.splitlines() on 20 MB of newlines would build 20 million strings.
    JSON Lines separates records by \\n only (a \\r before it is JSON whitespace); splitlines() would also
    break a record at a U+2028 inside a string."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def parse_jsonl(text: str, path: str | None = None) -> PromptSet:
    """Read JSONL text; each bad line is reported by number and skipped. Text over MAX_PROMPT_SET_BYTES
    or with more than MAX_PROMPT_SET_LINES lines is refused."""
    data = text.encode("utf-8", errors="replace")
    if len(data) > MAX_PROMPT_SET_BYTES:
        raise _too_big(len(data), f"Prompt set {path!r}" if path else "The prompt set")
    pairs, errors, n_bad = [], [], 0
    for line_no, line in enumerate(_lines(text), start=1):
        if line_no > MAX_PROMPT_SET_LINES:  # blank lines count too: each costs a step
            raise ExplorerInputError(f"{f'Prompt set {path!r}' if path else 'The prompt set'} has more than "
                                     f"{MAX_PROMPT_SET_LINES:,} lines; split it into smaller files.")
        if not line.strip():
            continue
        try:
            pairs.append(parse_pair(json.loads(line), default_id=f"line{line_no}"))
            continue
        except json.JSONDecodeError as exc:
            problem = f"line {line_no}: not valid JSON ({exc.msg})"
        except ExplorerInputError as exc:
            problem = f"line {line_no}: {exc}"
        n_bad += 1
        if n_bad <= MAX_REPORTED_ERRORS:
            errors.append(problem)
    if n_bad > MAX_REPORTED_ERRORS:
        errors.append(f"... and {n_bad - MAX_REPORTED_ERRORS} more bad lines ({n_bad} in all)")
    sha = hashlib.sha256(data).hexdigest()
    return PromptSet(pairs=pairs, errors=errors, path=path, sha256=sha)


def load_prompt_set(path: str | Path) -> PromptSet:
    path = Path(path)
    if not path.is_file():
        raise ExplorerInputError(f"Prompt set {str(path)!r} does not exist.")
    size = path.stat().st_size
    if size > MAX_PROMPT_SET_BYTES:  # refused before it is read
        raise _too_big(size, f"Prompt set {str(path)!r}")
    return parse_prompt_set_bytes(path.read_bytes(), str(path))


def parse_prompt_set_bytes(data: bytes, name: str) -> PromptSet:
    """A prompt set from a file's bytes (a file on disk or one uploaded in the app): at most
    MAX_PROMPT_SET_BYTES of UTF-8 JSONL with at least one valid pair; bad lines are reported by number."""
    if len(data) > MAX_PROMPT_SET_BYTES:
        raise _too_big(len(data), f"Prompt set {name!r}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExplorerInputError(f"Prompt set {name!r} is not UTF-8 text (byte {exc.start} cannot be read): "
                                 "save it as UTF-8.") from None
    result = parse_jsonl(text, path=name)
    if not result.pairs:
        detail = f" First problem: {result.errors[0]}" if result.errors else ""
        raise ExplorerInputError(f"Prompt set {name!r} has no valid pairs.{detail}")
    return result


def write_jsonl(pairs: list[PromptPair], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
