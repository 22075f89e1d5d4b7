"""GSM8K (grade-school math word problems, MIT): reward = the last number of the reply equals the gold
number (the text after "####" in the dataset's answer).

Splits: ``test`` is ``gsm8k/test.jsonl``; ``train``/``val`` split ``gsm8k/train.jsonl`` by a stable
hash of the question (10% val), since the dataset has no validation split.
"""
from __future__ import annotations

import re
from pathlib import Path

from experts.tasks.answers import last_number, parse_number
from experts.tasks.base import Example, Task, data_file, in_val_fold, read_jsonl

VAL_FRACTION = 0.1
INSTRUCTION = "Solve the problem step by step. End with the final answer as a number on its own line."


def gold_number(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def reference_solution(answer: str) -> str:
    """The dataset's worked solution without its calculator annotations ("<<48/2=24>>"), ending in
    a sentence the scorer reads."""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


class GSM8K(Task):
    name = "gsm8k"
    category = "math"
    max_tokens = 256

    def load(self, data_root: str | Path, split: str) -> list[Example]:
        self.check_split(split)
        fname = "test.jsonl" if split == "test" else "train.jsonl"
        out = []
        for i, r in enumerate(read_jsonl(data_file(data_root, "gsm8k", fname))):
            if split != "test" and in_val_fold(r["question"], VAL_FRACTION) != (split == "val"):
                continue
            out.append(Example(id=f"gsm8k/{fname.split('.')[0]}/{i}", question=f"{r['question']}\n{INSTRUCTION}",
                               answer=gold_number(r["answer"]), reference=reference_solution(r["answer"])))
        return out

    def parse(self, ex: Example, completion: str):
        n = last_number(completion)
        return None if n is None else str(n)

    def score(self, ex: Example, completion: str) -> bool:
        got, gold = last_number(completion), parse_number(ex.answer)
        return got is not None and gold is not None and got == gold
