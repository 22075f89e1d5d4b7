"""Generated tasks within the embedded model's reach: where Transformer²'s loop (SVF experts, pass 1, CEM)
can show its effect on a 135M-parameter model, whose paper benchmarks sit near zero.

SmolLM2-135M-Instruct answers these greedily at 10-50% (scored as below; 100 draws each): the product of
two digits (23%), their sum (26%), the last letter of a word (15%), and a format to follow: a word written
inside square brackets (8-14%). Four more tasks are never trained on; each needs a trained skill in another
form: a two-digit number plus a digit (addition's variant, 8%), the first letter of a word (the last letter's,
74%), a product plus a digit (multiplication then addition) and a word inside parentheses (the format's
variant, 0%). Pass 1 must route them.

Scoring reads what a reply commits to, not its wording: the last number of the reply for arithmetic; for
letters, the last quoted or bold single letter, else the last lone letter that is not the word "a" or "I"; for
formats, the last span between the asked delimiters (on one line), which must hold the word.
Answers are compared exactly (letters case-insensitively). The model tends to explain before it answers,
so a reply cut at ``max_tokens`` often has no answer yet: shorter replies are part of what training teaches.

Every (task, split) draws from its own random stream seeded by a stable hash of the names, so splits are
identical on every machine and independent of any training seed. ``seeded(n)`` gives the same task with a
test split drawn from stream n instead (``eval --seed n``: fresh test draws); seed 0 is the fixed test set.
Sums and products of two digits have only 64 distinct questions, so their splits share questions; the others
rarely do.
"""
from __future__ import annotations

import copy
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from experts.tasks.base import Example, Task

SIZES = {"train": 2000, "val": 200, "test": 500}
WORDS = (
    "apple", "bread", "chair", "dance", "eagle", "flame", "grape", "house", "island", "jelly", "kite", "lemon",
    "music", "night", "ocean", "piano", "queen", "river", "stone", "table", "uncle", "voice", "water", "yellow",
    "zebra", "garden", "window", "pocket", "silver", "basket", "candle", "doctor", "engine", "forest", "guitar",
    "hammer", "insect", "jacket", "kitten", "ladder", "monkey", "needle", "orange", "pencil", "rabbit", "sugar",
    "tomato", "velvet", "wallet", "butter", "cotton", "dragon", "figure", "ginger", "honest", "jungle", "marble",
    "number", "office", "planet", "rocket", "summer", "ticket", "valley", "winter", "bottle", "circle", "desert",
    "finger", "bridge", "cloud", "dream", "field", "glass", "heart", "light", "money", "paper", "smile", "train",
)
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def _word(rng: random.Random) -> str:
    """A real word, or (half the time) a pronounceable made-up one: the space of questions stays large."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3))) + \
        (rng.choice(CONSONANTS) if rng.random() < 0.5 else "")


def _mul(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b}?", str(a * b)


def _add(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} plus {b}?", str(a + b)


def _last(rng):
    w = _word(rng)
    return f'What is the last letter of the word "{w}"?', w[-1]


def _add2(rng):
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"What is {a} plus {b}?", str(a + b)


def _first(rng):
    w = _word(rng)
    return f'What is the first letter of the word "{w}"?', w[0]


def _bracket(rng):
    w = _word(rng)
    return f'Write the word "{w}" inside square brackets.', f"[{w}]"


def _paren(rng):
    w = _word(rng)
    return f'Write the word "{w}" inside parentheses.', f"({w})"


def _muladd(rng):
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b} plus {c}?", str(a * b + c)


@dataclass(frozen=True)
class Spec:
    make: Callable[[random.Random], tuple[str, str]]  # -> (question, answer)
    kind: str  # number | letter | wrapped (the answer is the word between the delimiters of the answer)
    category: str  # the skill pass 1 should pick for it
    trained: bool  # an expert is trained on it (else: unseen, for pass 1)


SPECS: dict[str, Spec] = {
    "mini-mul": Spec(_mul, "number", "multiplication", True),
    "mini-add": Spec(_add, "number", "addition", True),
    "mini-last": Spec(_last, "letter", "letters", True),
    "mini-bracket": Spec(_bracket, "wrapped", "format", True),
    "mini-add2": Spec(_add2, "number", "addition", False),
    "mini-first": Spec(_first, "letter", "letters", False),
    "mini-muladd": Spec(_muladd, "number", "multiplication", False),
    "mini-paren": Spec(_paren, "wrapped", "format", False),
}
TRAINED = tuple(n for n, s in SPECS.items() if s.trained)
UNSEEN = tuple(n for n, s in SPECS.items() if not s.trained)
CATEGORIES = tuple(dict.fromkeys(SPECS[n].category for n in TRAINED))
GUIDELINES = {"multiplication": "multiplying numbers", "addition": "adding or subtracting numbers",
              "letters": "questions about the letters of a word",
              "format": "writing a word in a requested format"}


def read_number(text: str) -> str | None:
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not nums:
        return None
    n = nums[-1].replace(",", "").rstrip(".")
    return n[:-2] if n.endswith(".0") else n


def read_letter(text: str) -> str | None:
    marked = re.findall(r"[\"'“‘*]+([A-Za-z])[\"'”’*]+", text)
    if marked:
        return marked[-1].lower()
    lone = [c for c in re.findall(r"(?<![A-Za-z'’])([A-Za-z])(?![A-Za-z'’])", text) if c not in ("a", "I")]
    return lone[-1].lower() if lone else None


def read_wrapped(text: str, opening: str, closing: str) -> str | None:
    """The last span of the reply between ``opening`` and ``closing`` on one line, delimiters kept, lowercased."""
    spans = re.findall(f"{re.escape(opening)}([^{re.escape(opening + closing)}\n]*){re.escape(closing)}", text)
    return f"{opening}{spans[-1]}{closing}".lower() if spans else None


def _stream(task: str, split: str, seed: int) -> random.Random:
    key = f"{task}/{split}" if seed == 0 else f"{task}/{split}/{seed}"
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


class MiniatureTask(Task):
    max_tokens = 48
    guidelines = GUIDELINES  # pass 1's lines for these categories
    experts_from = TRAINED  # the experts few-shot CEM mixes

    def __init__(self, name: str, test_seed: int = 0):
        self.name, self.spec, self.test_seed = name, SPECS[name], test_seed
        self.category = self.spec.category
        self.splits = ("train", "val", "test") if self.spec.trained else ("val", "test")  # few-shot shots: val

    def seeded(self, seed: int) -> "MiniatureTask":
        t = copy.copy(self)
        t.test_seed = seed
        return t

    def load(self, data_root: str | Path | None, split: str) -> list[Example]:
        self.check_split(split)
        rng = _stream(self.name, split, self.test_seed if split == "test" else 0)
        out = []
        for i in range(SIZES[split]):
            q, a = self.spec.make(rng)
            out.append(Example(id=f"{self.name}/{split}/{self.test_seed if split == 'test' else 0}/{i}", question=q,
                               answer=a, reference=self._reference(a)))
        return out

    def _reference(self, answer: str) -> str:
        if self.spec.kind == "wrapped":
            return answer
        return f"The answer is {answer}." if self.spec.kind == "number" else f'The answer is "{answer}".'

    def parse(self, ex: Example, completion: str):
        if self.spec.kind == "wrapped":
            return read_wrapped(completion, ex.answer[0], ex.answer[-1])
        return read_number(completion) if self.spec.kind == "number" else read_letter(completion)

    def score(self, ex: Example, completion: str) -> bool:
        got = self.parse(ex, completion)
        return got is not None and got == str(ex.answer).lower()


MINIATURE_TASKS = tuple(MiniatureTask(n) for n in SPECS)


def classification():
    """The classifier expert's task for these skills: requests of the trained tasks (train, val) and of
    the unseen ones (test), labelled with the skill they need."""
    from experts.tasks.cls import Classification

    tasks = {n: t for n, t in zip(SPECS, MINIATURE_TASKS)}
    sources = {"train": tuple((tasks[n], "train") for n in TRAINED), "val": tuple((tasks[n], "val") for n in TRAINED),
               "test": tuple((tasks[n], "test") for n in UNSEEN)}
    return Classification("mini-cls", CATEGORIES, sources, GUIDELINES)
