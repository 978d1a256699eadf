"""Synthetic task families with one-token answers, deterministic from a seed.

Each generator returns PromptPairs whose clean and corrupted prompts have the same
number of words (so per-position patching works) and different answers.
Families: set completion, indirect object identification (IOI), factual recall over
an invented world, and induction (copying a continuation seen earlier).
"""
from __future__ import annotations

import random

from explorer.core.prompts import PromptPair

FRUITS = ["Peach", "Orange", "Grape", "Mango", "Apple", "Pear", "Plum", "Lemon", "Cherry", "Banana", "Melon", "Kiwi"]
OWNERS = ["Man", "Woman", "Boy", "Girl", "Farmer", "Cook"]
COUNT_WORDS = {3: "three", 4: "four", 5: "five"}

NAMES = ["Mary", "John", "Anna", "Tom", "Lucy", "Paul", "Emma", "Mark", "Sara", "Jack", "Kate", "Adam",
         "Rose", "Carl", "Lily", "Dave", "Nora", "Ivan", "Ella", "Owen"]
PLACES = ["store", "park", "school", "garden", "station", "market"]
OBJECTS = ["drink", "book", "ball", "gift", "letter", "key"]
IOI_TEMPLATES = [
    "When {A} and {B} went to the {P} , {S} gave a {O} to",
    "Then , {A} and {B} had fun at the {P} . {S} gave a {O} to",
    "After {A} and {B} walked to the {P} , {S} handed a {O} to",
]

COUNTRIES = ["Zorbia", "Vantia", "Quilon", "Merov", "Taskar", "Brelia", "Dunmar", "Ostova", "Pellin", "Ruvan",
             "Sefira", "Kolvat", "Yandor", "Elmora", "Gravos", "Hestia", "Ivoria", "Jurak", "Lumaro", "Nerith"]
CAPITALS = ["Kelt", "Amsor", "Birn", "Corvel", "Dask", "Emmen", "Farro", "Gilth", "Holm", "Istra", "Jorn",
            "Kavel", "Lirr", "Mosk", "Nebb", "Orwin", "Pravo", "Quist", "Rell", "Sarn"]
LANGUAGES = ["Zorbic", "Vantese", "Quilish", "Merovan", "Taskari", "Brelic", "Dunmari", "Ostovan"]
ANIMALS = ["fox", "owl", "bear", "wolf", "hawk", "deer", "lynx", "crane"]
RELATIONS = {"capital": "The capital of {X} is", "language": "The language of {X} is",
             "animal": "The animal of {X} is"}

SYMBOLS = ["ka", "mo", "ri", "tu", "fe", "ba", "zo", "lu", "pi", "ne", "go", "sha", "vi", "do", "ye", "wu",
           "qi", "ha", "ju", "xo", "ce", "nu", "ro", "te"]


def world_facts(seed: int = 1234) -> dict[str, dict[str, str]]:
    """The invented world: every country's capital, language and animal (fixed by seed)."""
    rng = random.Random(seed)
    capitals = CAPITALS[:]
    rng.shuffle(capitals)
    return {c: {"capital": capitals[i], "language": rng.choice(LANGUAGES), "animal": rng.choice(ANIMALS)}
            for i, c in enumerate(COUNTRIES)}


def set_completion_draw(rng: random.Random, fruits: list[str], owners: list[str]) -> dict:
    """The content of one set-completion pair (shared by the demo and the natural-language sets):
    a declared set of 3-4 fruits, all but one counted; corrupted = one counted item swapped for the
    missing one, which makes the swapped-out item the answer."""
    n = rng.choice([3, 4])
    items = rng.sample(fruits, n)
    missing = items[-1]
    counted = items[:-1]
    rng.shuffle(counted)
    owner = rng.choice(owners)
    declared = items[:]
    rng.shuffle(declared)
    swap = rng.randrange(len(counted))
    corrupted = counted[:]
    swapped_out = corrupted[swap]
    corrupted[swap] = missing
    return {"n": n, "owner": owner, "declared": declared, "counted": counted, "corrupted": corrupted,
            "missing": missing, "swapped_out": swapped_out, "swap": swap}


def set_completion(rng: random.Random) -> PromptPair:
    d = set_completion_draw(rng, FRUITS, OWNERS)
    declared = d["declared"]
    head = f"{d['owner']} has {COUNT_WORDS[d['n']]} fruits , " + " , ".join(declared[:-1]) + f" and {declared[-1]} -"
    # The prompt stops before the last count: it lists the n-1 counted items, then "and 1".
    clean = f"{head} " + " ".join(f"1 {x}" for x in d["counted"]) + " and 1"
    corrupted = f"{head} " + " ".join(f"1 {x}" for x in d["corrupted"]) + " and 1"
    return PromptPair(clean=clean, corrupted=corrupted, clean_answer=d["missing"], corrupted_answer=d["swapped_out"],
                      task="set_completion", notes=f"set of {d['n']}; counted item {d['swap']} swapped")


def ioi(rng: random.Random) -> PromptPair:
    a, b = rng.sample(NAMES, 2)
    template = rng.choice(IOI_TEMPLATES)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    io, s = (a, b) if rng.random() < 0.5 else (b, a)  # ABBA or BABA order
    clean = template.format(A=a, B=b, P=place, O=obj, S=s)
    corrupted = template.format(A=a, B=b, P=place, O=obj, S=io)
    order = "ABBA" if s == b else "BABA"
    return PromptPair(clean=clean, corrupted=corrupted, clean_answer=io, corrupted_answer=s,
                      task="ioi", notes=order)


def factual_recall(rng: random.Random, facts: dict | None = None) -> PromptPair:
    facts = facts or world_facts()
    relation = rng.choice(list(RELATIONS))
    x = rng.choice(COUNTRIES)
    candidates = [c for c in COUNTRIES if facts[c][relation] != facts[x][relation] and c != x]
    y = rng.choice(candidates)
    prefix = ""
    if rng.random() < 0.6:  # a distractor fact about a third country, same relation
        z = rng.choice([c for c in COUNTRIES if c not in (x, y)])
        prefix = RELATIONS[relation].format(X=z) + f" {facts[z][relation]} . "
    clean = prefix + RELATIONS[relation].format(X=x)
    corrupted = prefix + RELATIONS[relation].format(X=y)
    return PromptPair(clean=clean, corrupted=corrupted, clean_answer=facts[x][relation],
                      corrupted_answer=facts[y][relation], task="factual_recall",
                      notes=relation + (" with distractor" if prefix else ""))


def induction(rng: random.Random) -> PromptPair:
    length = rng.choice([5, 6, 7])
    pool = rng.sample(SYMBOLS, length + 1)
    seq, spare = pool[:length], pool[length]
    k = rng.randrange(1, length - 1)  # repeat k symbols; the answer is the next one
    first = "seq : " + " ".join(seq) + " . again :"
    corrupted_seq = seq[:]
    corrupted_seq[k] = spare
    repeat = " " + " ".join(seq[:k])
    clean = first + repeat
    corrupted = "seq : " + " ".join(corrupted_seq) + " . again :" + repeat
    return PromptPair(clean=clean, corrupted=corrupted, clean_answer=seq[k], corrupted_answer=spare,
                      task="induction", notes=f"length {length}, copy after {k}")


GENERATORS = {"set_completion": set_completion, "ioi": ioi, "factual_recall": factual_recall,
              "induction": induction}


def _control(pair: PromptPair, pool: list[str], rng: random.Random) -> PromptPair:
    """Same prompts, but the answer contrast is two candidates the mechanism never selects:
    neither appears in the prompt as the answer. Ablating the circuit should barely move it."""
    words = set(pair.clean.split()) | set(pair.corrupted.split()) | {pair.clean_answer, pair.corrupted_answer}
    a, b = rng.sample([w for w in pool if w not in words], 2)
    return PromptPair(clean=pair.clean, corrupted=pair.corrupted, clean_answer=a, corrupted_answer=b,
                      category="control", task=pair.task, notes="control: contrast of two unselected answers")


CONTROL_POOLS = {"set_completion": FRUITS, "ioi": NAMES, "factual_recall": CAPITALS + LANGUAGES + ANIMALS,
                 "induction": SYMBOLS}


def make_pairs(task: str, n: int, seed: int, exclude: set[str] = frozenset()) -> list[PromptPair]:
    """n distinct headline pairs of one family, skipping clean prompts in `exclude`."""
    rng = random.Random(f"{task}:{seed}")
    gen = GENERATORS[task]
    out, seen = [], set(exclude)
    while len(out) < n:
        pair = gen(rng)
        if pair.clean in seen:
            continue
        seen.add(pair.clean)
        out.append(PromptPair(**{**pair.to_dict(), "id": f"{task}-{seed}-{len(out)}"}))
    return out


def make_controls(task: str, headline: list[PromptPair], n: int, seed: int) -> list[PromptPair]:
    rng = random.Random(f"control:{task}:{seed}")
    out = []
    for i, pair in enumerate(headline[:n]):
        c = _control(pair, CONTROL_POOLS[task], rng)
        out.append(PromptPair(**{**c.to_dict(), "id": f"{task}-control-{i}"}))
    return out


def vocabulary() -> list[str]:
    """Every word any generator can emit."""
    words = set(FRUITS + OWNERS + list(COUNT_WORDS.values()) + NAMES + PLACES + OBJECTS + COUNTRIES + CAPITALS
                + LANGUAGES + ANIMALS + SYMBOLS)
    for text in IOI_TEMPLATES + list(RELATIONS.values()):
        words.update(w for w in text.split() if not w.startswith("{"))
    words.update(["has", "fruits", ",", "and", "-", "1", ".", "seq", ":", "again"])
    return sorted(words)
