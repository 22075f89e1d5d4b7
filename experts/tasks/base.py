"""What a task is: a loader for its splits, the chat prompt it asks, and a scorer for the reply.

Tasks are plug-ins (see ``experts/tasks/__init__.py`` for the registry). Data never ships with the
code: every loader takes the data root (``<root>/gsm8k/train.jsonl``, ``<root>/arc/ARC-Easy-Test.jsonl``,
...; docs/training.md lists the layout) or the task's own folder, and reads JSON Lines. The root has one
name everywhere: a command's ``--data``, else ``$T2_DATA_DIR`` (``data_root``).

Splits: ``train`` and ``val`` are what training may touch (``val`` picks the best checkpoint);
``test`` is held out for evaluation only. Tasks that exist only for evaluation (HumanEval, MATH-500)
have just ``test``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

SPLITS = ("train", "val", "test")
DATA_ENV = "T2_DATA_DIR"  # the data root when a command is given no --data
DATA_LAYOUT = "<root>/gsm8k/, mbpp/, humaneval/, arc/, math500/ (docs/training.md: 'Benchmark data')"


@dataclass(frozen=True)
class Example:
    id: str
    question: str  # the user's request, as the chat's user message (pass 1 classifies this text)
    answer: Any  # what the scorer compares against (a number, a letter, a LaTeX string, a label)
    reference: str = ""  # one correct reply, the target of the next-token objective ("" if none)
    meta: Mapping[str, Any] = field(default_factory=dict)  # task-specific (tests, choices, ...)


class Task:
    """Base class of every task; subclasses set the class attributes and implement ``load``/``score``."""

    name: str = ""
    category: str = ""  # what pass 1 should route it to: math | code | reasoning (cls labels)
    max_tokens: int = 256  # new tokens a reply may use
    splits: tuple[str, ...] = SPLITS
    system: str | None = None  # None: the chat template's default system prompt

    def load(self, data_root: str | Path, split: str) -> list[Example]:
        raise NotImplementedError

    def seeded(self, seed: int) -> "Task":
        """This task with its test split drawn from generator seed ``seed`` (generated tasks; a task read
        from files has one test set and returns itself)."""
        return self

    def messages(self, ex: Example) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": ex.question}]

    def prompt_ids(self, tokenizer, ex: Example) -> list[int]:
        """Token ids the model continues (the chat through its template, by default)."""
        return render_prompt(tokenizer, self.messages(ex))

    def parse(self, ex: Example, completion: str) -> Any:
        """What the scorer reads from the reply (for logs and reports)."""
        return completion

    def score(self, ex: Example, completion: str) -> bool:
        raise NotImplementedError

    def score_many(self, examples: Sequence[Example], completions: Sequence[str]) -> list[bool]:
        """One verdict per reply; code tasks override this to run their sandboxes in parallel."""
        return [self.score(e, c) for e, c in zip(examples, completions)]

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no {split!r} split (it has {', '.join(self.splits)})")


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat through the model's template, ready for the assistant's reply.

    Without a chat template the turns are joined as plain text (tiny test models, base models).
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)  # the template wrote BOS and role markers
    text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
    return tokenizer.encode(text)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class DataMissingError(FileNotFoundError):
    """A benchmark file is not where the data root says (the data is not part of the repository)."""


def data_root(given: str | Path | None) -> str | None:
    """The benchmark data root: ``given`` (a command's ``--data``), else ``$T2_DATA_DIR``, else None
    (generated tasks need none; a task that reads files then says what is missing). A root named but
    absent is an error at once, before any model loads."""
    root = given or os.environ.get(DATA_ENV) or None
    if root is not None and not Path(root).is_dir():
        origin = "--data" if given else DATA_ENV
        raise DataMissingError(f"no data root at {root} ({origin}): benchmark data is not part of the repository; "
                               f"lay it out as {DATA_LAYOUT}")
    return None if root is None else str(root)


def data_file(root: str | Path | None, folder: str, name: str) -> Path:
    """``<root>/<folder>/<name>``, or ``<root>/<name>`` when ``root`` is the task's own folder."""
    if root is None:
        raise DataMissingError(f"{folder}/{name} needs the benchmark data, which is not part of the repository: "
                               f"pass --data DIR or set {DATA_ENV}, laid out as {DATA_LAYOUT}")
    root = Path(root)
    for p in (root / folder / name, root / name):
        if p.is_file():
            return p
    raise DataMissingError(f"{folder}/{name} not found under {root}: benchmark data is not part of the repository; "
                           f"put the file at <data root>/{folder}/{name} (docs/training.md: 'Benchmark data')")


def in_val_fold(key: str, fraction: float) -> bool:
    """Deterministic train/val split of a file that has no val split: a stable hash of the record's
    key, so the fold never depends on file order or on the random seed."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2.0**64 < fraction
