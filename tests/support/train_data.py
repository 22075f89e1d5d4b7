"""Tiny task data written by the tests themselves, in the field layout of the benchmark data root (docs/training.md).

Every record here was made up for these tests (no record is copied from a benchmark), so no dataset
license applies. Only a handful per file: enough for loaders, scorers and a two-step training run.
"""
from __future__ import annotations

import json
from pathlib import Path


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def arc_record(i: int, stem: str, choices: list[str], key: str, numeric: bool = False) -> dict:
    labels = [str(j + 1) for j in range(len(choices))] if numeric else list("ABCD"[:len(choices)])
    return {"id": f"T_{i}", "question": {"stem": stem, "choices": [{"text": t, "label": lab}
                                                                     for t, lab in zip(choices, labels)]},
            "answerKey": key}


ARC_QUESTIONS = [
    ("What do plants need from sunlight to make food?", ["heat", "light energy", "wind", "sound"], "B"),
    ("Which object is a magnet most likely to pick up?", ["a paper clip", "a pencil", "a rubber band", "a cork"], "A"),
    ("What is the state of water at 120 degrees Celsius at sea level?", ["solid", "liquid", "gas", "plasma"], "C"),
    ("Which animal is a mammal?", ["frog", "shark", "eagle", "whale"], "D"),
    ("What causes day and night on Earth?", ["the Moon", "Earth's rotation", "clouds", "the seasons"], "B"),
    ("Which tool measures temperature?", ["a ruler", "a scale", "a thermometer", "a compass"], "C"),
]


def write_arc(root: Path, subset: str = "Easy") -> Path:
    recs = [arc_record(i, s, c, k) for i, (s, c, k) in enumerate(ARC_QUESTIONS)]
    recs.append(arc_record(99, "How many legs does a spider have?", ["six", "eight", "ten", "four"], "2", numeric=True))
    _write(root / "arc" / f"ARC-{subset}-Train.jsonl", recs[:4])
    _write(root / "arc" / f"ARC-{subset}-Dev.jsonl", recs[4:6])
    _write(root / "arc" / f"ARC-{subset}-Test.jsonl", recs[5:])
    return root


def write_gsm8k(root: Path) -> Path:
    recs = [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
         "answer": "He has 3+4=<<3+4=7>>7 apples.\n#### 7"},
        {"question": "A box holds 12 pens. How many pens are in 10 boxes?",
         "answer": "10*12=<<10*12=120>>120 pens.\n#### 120"},
        {"question": "Sara earns $1,250 a week. How much does she earn in 2 weeks?",
         "answer": "2*1250=<<2*1250=2500>>2500 dollars.\n#### 2,500"},
    ]
    _write(root / "gsm8k" / "train.jsonl", recs)
    _write(root / "gsm8k" / "test.jsonl", recs[:2])
    return root


def write_mbpp(root: Path) -> Path:
    def rec(tid, text, code, tests):
        return {"text": text, "code": code, "task_id": tid, "test_setup_code": "", "test_list": tests,
                "challenge_test_list": []}
    recs = [
        rec(11, "Write a function to add two numbers.", "def add(a, b):\n    return a + b",
            ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
        rec(520, "Write a function to double a number.", "def double(x):\n    return 2 * x",
            ["assert double(4) == 8"]),
        rec(700, "Write a function that returns the last element of a list.", "def last(xs):\n    return xs[-1]",
            ["assert last([1, 2, 3]) == 3"]),
    ]
    _write(root / "mbpp" / "mbpp.jsonl", recs)
    return root


def write_humaneval(root: Path) -> Path:
    prompt = 'def triple(x: int) -> int:\n    """Return three times x.\n    >>> triple(2)\n    6\n    """\n'
    _write(root / "humaneval" / "HumanEval.jsonl", [{
        "task_id": "Test/0", "prompt": prompt, "canonical_solution": "    return 3 * x\n",
        "test": "def check(candidate):\n    assert candidate(2) == 6\n    assert candidate(-1) == -3\n",
        "entry_point": "triple"}])
    return root


def write_math500(root: Path) -> Path:
    _write(root / "math500" / "test.jsonl", [
        {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "The sum is $\\boxed{\\frac{3}{4}}$.",
         "answer": "\\frac{3}{4}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
        {"problem": "Solve $2x = 10$.", "solution": "$x = \\boxed{5}$.", "answer": "5", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/2.json"},
    ])
    return root


def write_all(root: Path) -> Path:
    for fn in (write_gsm8k, write_mbpp, write_humaneval, write_math500):
        fn(root)
    write_arc(root, "Easy")
    write_arc(root, "Challenge")
    return root
