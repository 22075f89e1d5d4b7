"""ARC (AI2 Reasoning Challenge, CC BY-SA 4.0), Easy and Challenge sets: reward = the choice letter
read from the reply equals the answer key.

Files ``arc/ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl`` map to the train/val/test splits. A few
questions label their choices 1-4; they are shown (and scored) as A-D so every prompt looks alike.

``arc-easy-text`` and ``arc-challenge-text`` ask the same questions with the choices listed without letters
and the answer given as the choice's own words; a reply scores when the one choice it names is the right
one. Small models bind answers to letters poorly: SmolLM2-135M-Instruct answers "A" to 963 of the 1,240
ARC-Easy test questions in the letter form (23.5%, below chance). In the text form it scores 21.1% of the 570
validation questions: 219 replies name no choice or several, and of the 351 that commit to one, 34% are right,
spread over the four positions (A 127, B 70, C 74, D 80). What it knows shows; committing is what it lacks.
"""
from __future__ import annotations

import re
from pathlib import Path

from experts.tasks.answers import choice_letter
from experts.tasks.base import Example, Task, data_file, read_jsonl

FILES = {"train": "Train", "val": "Dev", "test": "Test"}
LETTERS = "ABCDEFGH"
INSTRUCTION = "Answer with the letter of the correct choice."
TEXT_INSTRUCTION = "Answer with the correct choice, word for word."


def arc_example(r: dict, text_answers: bool = False) -> Example:
    choices = r["question"]["choices"]
    labels = [c["label"] for c in choices]
    shown = list(LETTERS[:len(choices)])
    key = shown[labels.index(r["answerKey"])]
    text = choices[labels.index(r["answerKey"])]["text"]
    meta = {"labels": shown, "choices": [c["text"] for c in choices]}
    if text_answers:
        lines = [r["question"]["stem"], "", "Choices:"] + [f"- {c['text']}" for c in choices]
        return Example(id=f"arc/{r['id']}", question="\n".join(lines) + f"\n\n{TEXT_INSTRUCTION}", answer=key,
                       reference=text, meta=meta)
    lines = [r["question"]["stem"], ""] + [f"{s}. {c['text']}" for s, c in zip(shown, choices)]
    question = "\n".join(lines) + f"\n\n{INSTRUCTION}"
    return Example(id=f"arc/{r['id']}", question=question, answer=key, reference=f"The answer is {key}. {text}",
                   meta=meta)


class ARC(Task):
    category = "reasoning"
    max_tokens = 64

    text_answers = False  # the choices without letters, answered in their own words (ARCText)

    def __init__(self, name: str, subset: str):
        self.name, self.subset = name, subset  # subset: "Easy" | "Challenge"

    def load(self, data_root: str | Path, split: str) -> list[Example]:
        self.check_split(split)
        path = data_file(data_root, "arc", f"ARC-{self.subset}-{FILES[split]}.jsonl")
        return [arc_example(r, self.text_answers) for r in read_jsonl(path)]

    def parse(self, ex: Example, completion: str):
        return choice_letter(completion, list(ex.meta["labels"]), list(ex.meta["choices"]))

    def score(self, ex: Example, completion: str) -> bool:
        return self.parse(ex, completion) == ex.answer


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _named(reply: str, texts: list[str], exact: bool) -> list[int]:
    """Indices of the choices whose text the reply holds as whole words (``exact``: case and signs kept)."""
    if exact:
        return [i for i, t in enumerate(texts) if t and re.search(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])",
                                                                   reply)]
    low = f" {_norm(reply)} "
    return [i for i, t in enumerate(texts) if t and f" {t} " in low]


def named_choice(reply: str, choices: list[str]) -> int | None:
    """The index of the one choice a reply names (its words appear in the reply; a choice found only inside
    another named choice, as "heat" in "heat transfer", does not count), or None: no choice, or several.
    Case and punctuation are ignored unless two choices differ only in them ("Rr" and "rr", "10^3" and
    "10^-3"); then they count."""
    for exact in (False, True):
        texts = [c.strip().rstrip(".").strip() if exact else _norm(c) for c in choices]
        hits = _named(reply, texts, exact)
        hits = [i for i in hits if not any(texts[i] != texts[j] and texts[i] in texts[j] for j in hits)]
        named = {texts[i] for i in hits}
        if len(named) != 1:
            return None
        if texts.count(named.pop()) == 1:
            return hits[0]
    return None


class ARCText(ARC):
    """ARC with the answer in the choice's own words (module docstring)."""

    text_answers = True

    def parse(self, ex: Example, completion: str):
        i = named_choice(completion, list(ex.meta["choices"]))
        return None if i is None else ex.meta["labels"][i]
