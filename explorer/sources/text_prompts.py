"""Natural-language prompt sets for real models: IOI, factual recall, antonyms, fruit set completion.

`python -m explorer.sources.text_prompts --model smollm2` writes prompts/<prefix>_<family>.jsonl, keeping
only pairs whose answers are single tokens and whose prompts have equal token lengths in
that model's tokenizer. Sets are deterministic (seeded).
"""
from __future__ import annotations

import argparse
import itertools
import random

from explorer.sources.demo.tasks import set_completion_draw
from explorer.core.prompts import PromptPair, tokenize_pair, write_jsonl
from explorer.core.errors import ExplorerInputError
from explorer.core.runtime import REPO_ROOT

NAMES = ["Mary", "John", "Anna", "Tom", "Lucy", "Paul", "Emma", "Mark", "Sarah", "Jack", "Kate", "Adam", "Rose",
         "Carl", "Lily", "David", "Peter", "Ella", "James", "Alice", "Bob", "Michael", "Laura", "Robert", "Linda",
         "Daniel", "Susan", "Kevin", "Amy", "Brian", "Helen", "Eric", "Grace", "Frank", "Julia", "George", "Emily"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the store, {S} gave a drink to",
    "After {A} and {B} went to the park, {S} handed a ball to",
    "Then, {A} and {B} had a long argument. Afterwards, {S} said to",
    "While {A} and {B} were working at the office, {S} gave a report to",
    "When {A} and {B} got a snack at the cafe, {S} decided to give it to",
    "Friends {A} and {B} found a necklace at the beach. {S} gave it to",
]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Portugal": "Lisbon",
            "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin", "Norway": "Oslo",
            "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest", "Egypt": "Cairo", "Japan": "Tokyo",
            "China": "Beijing", "Russia": "Moscow", "Canada": "Ottawa", "Australia": "Canberra"}
SYMBOLS = {"gold": "Au", "silver": "Ag", "iron": "Fe", "copper": "Cu", "sodium": "Na", "potassium": "K",
           "lead": "Pb", "tin": "Sn", "mercury": "Hg", "oxygen": "O", "hydrogen": "H", "carbon": "C",
           "nitrogen": "N", "helium": "He", "calcium": "Ca", "zinc": "Zn", "neon": "Ne", "sulfur": "S"}
LANGUAGES = {"France": "French", "Germany": "German", "Spain": "Spanish", "Italy": "Italian",
             "Portugal": "Portuguese", "Poland": "Polish", "Greece": "Greek", "Sweden": "Swedish",
             "Finland": "Finnish", "Japan": "Japanese", "China": "Chinese", "Russia": "Russian",
             "Turkey": "Turkish", "Korea": "Korean", "Hungary": "Hungarian", "Norway": "Norwegian"}
FACT_TEMPLATES = {"capital": (CAPITALS, "The capital of {X} is the city of"),
                  "chemical_symbol": (SYMBOLS, "The chemical symbol for {X} is"),
                  "language": (LANGUAGES, "The official language of {X} is")}
ANTONYMS = {"hot": "cold", "big": "small", "tall": "short", "fast": "slow", "light": "dark", "right": "wrong",
            "good": "bad", "new": "old", "up": "down", "in": "out", "early": "late", "happy": "sad", "rich": "poor",
            "strong": "weak", "open": "closed", "high": "low", "hard": "soft", "wet": "dry", "full": "empty",
            "loud": "quiet", "first": "last", "thin": "thick"}
ANTONYM_TEMPLATES = ["The opposite of {X} is", "The word {X} means the opposite of"]
FRUITS = ["Orange", "Apple", "Pear", "Lemon", "Cherry", "Fig", "Coconut", "Olive", "Peach", "Grape", "Mango",
          "Banana", "Plum", "Melon", "Kiwi"]
COUNT = {3: "three", 4: "four"}


def ioi_candidates(rng):
    while True:
        a, b = rng.sample(NAMES, 2)
        template = rng.choice(IOI_TEMPLATES)
        io, s = (a, b) if rng.random() < 0.5 else (b, a)
        yield PromptPair(template.format(A=a, B=b, S=s), template.format(A=a, B=b, S=io), " " + io, " " + s,
                         task="ioi", notes="ABBA" if s == b else "BABA")


def fact_candidates(rng):
    while True:
        relation = rng.choice(list(FACT_TEMPLATES))
        table, template = FACT_TEMPLATES[relation]
        x, y = rng.sample(list(table), 2)
        yield PromptPair(template.format(X=x), template.format(X=y), " " + table[x], " " + table[y],
                         task="factual_recall", notes=relation)


def antonym_candidates(rng):
    while True:
        x, y = rng.sample(list(ANTONYMS), 2)
        template = rng.choice(ANTONYM_TEMPLATES)
        yield PromptPair(template.format(X=x), template.format(X=y), " " + ANTONYMS[x], " " + ANTONYMS[y],
                         task="antonyms")


def set_completion_candidates(rng):
    """The seed study's task in natural language: the missing fruit of a declared set."""
    while True:
        d = set_completion_draw(rng, FRUITS, ["Man"])
        declared = d["declared"]
        head = f"Man has {COUNT[d['n']]} fruits, " + ", ".join(declared[:-1]) + f" and {declared[-1]} -"
        yield PromptPair(f"{head} " + " ".join(f"1 {x}" for x in d["counted"]) + " and 1",
                         f"{head} " + " ".join(f"1 {x}" for x in d["corrupted"]) + " and 1",
                         " " + d["missing"], " " + d["swapped_out"], task="set_completion", notes=f"set of {d['n']}")


FAMILIES = {"ioi": ioi_candidates, "factual_recall": fact_candidates, "antonyms": antonym_candidates,
            "set_completion": set_completion_candidates}
CONTROL_POOLS = {"ioi": [" " + n for n in NAMES],
                 "factual_recall": [" " + v for v in itertools.chain(CAPITALS.values(), SYMBOLS.values(), LANGUAGES.values())],
                 "antonyms": [" " + v for v in ANTONYMS.values()], "set_completion": [" " + f for f in FRUITS]}


def build_family(tokenizer, family: str, n: int = 120, n_control: int = 12, seed: int = 0,
                 max_tries: int = 100_000) -> list[PromptPair]:
    rng = random.Random(f"{family}:{seed}")
    pairs, seen = [], set()
    for _, pair in zip(range(max_tries), FAMILIES[family](rng)):
        if (pair.clean, pair.corrupted) in seen:
            continue
        try:
            tp = tokenize_pair(tokenizer, pair)
        except ExplorerInputError:
            continue  # an answer that is not one token in this tokenizer
        if not tp.same_length or tp.clean_answer_id == tp.corrupted_answer_id:
            continue
        seen.add((pair.clean, pair.corrupted))
        pairs.append(PromptPair(**{**pair.to_dict(), "id": f"{family}-{len(pairs):03d}"}))
        if len(pairs) == n:
            break
    controls = []
    pool = [w for w in CONTROL_POOLS[family] if len(tokenizer.encode(w, add_special_tokens=False)) == 1]
    for pair in pairs[:n_control]:
        used = {pair.clean_answer, pair.corrupted_answer} | {" " + w.strip(",.") for w in pair.clean.split()}
        a, b = rng.sample([w for w in pool if w not in used], 2)
        controls.append(PromptPair(pair.clean, pair.corrupted, a, b, id=f"{family}-control-{len(controls)}",
                                   category="control", task=family, notes="control: two unselected answers"))
    return pairs + controls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prefix", default=None)
    args = parser.parse_args(argv)
    from explorer.sources.models import load_tokenizer, resolve_model_path
    _, folder = resolve_model_path(args.model)
    tokenizer = load_tokenizer(folder)
    prefix = args.prefix or args.model
    for family in FAMILIES:
        pairs = build_family(tokenizer, family)
        write_jsonl(pairs, REPO_ROOT / "prompts" / f"{prefix}_{family}.jsonl")
        print(family, sum(p.category == "headline" for p in pairs), "headline", sum(p.category == "control" for p in pairs), "control")


if __name__ == "__main__":
    main()
