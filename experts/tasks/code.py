"""Code tasks: MBPP (CC BY 4.0) for training and HumanEval (MIT) for evaluation. Reward = the program
built from the reply passes the task's tests, run in the sandbox (``sandbox.py``), never in this process.

MBPP splits follow the dataset's own task-id ranges in ``mbpp/mbpp.jsonl``: 601-974 train, 511-600
val, 11-510 test (1-10 are its few-shot prompt examples, unused). The prompt shows the first test
only, as the MBPP+ prompt Transformer² trained with does; all tests are run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from experts.tasks.answers import extract_code
from experts.tasks.base import Example, Task, data_file, read_jsonl
from experts.tasks.sandbox import SandboxLimits, run_many

MBPP_RANGES = {"train": (601, 974), "val": (511, 600), "test": (11, 510)}
FENCE_REQUEST = "Write the complete function in a ```python code block."


class CodeTask(Task):
    category = "code"
    max_tokens = 320
    limits = SandboxLimits(timeout_s=10.0, memory_mb=1024)

    def program(self, ex: Example, completion: str) -> str:
        raise NotImplementedError

    def parse(self, ex: Example, completion: str):
        return extract_code(completion)

    def score(self, ex: Example, completion: str) -> bool:
        return self.score_many([ex], [completion])[0]

    def score_many(self, examples: Sequence[Example], completions: Sequence[str]) -> list[bool]:
        programs = [self.program(e, c) for e, c in zip(examples, completions)]
        return [r.passed for r in run_many(programs, self.limits)]


class MBPP(CodeTask):
    name = "mbpp"

    def load(self, data_root: str | Path, split: str) -> list[Example]:
        self.check_split(split)
        lo, hi = MBPP_RANGES[split]
        out = []
        for r in read_jsonl(data_file(data_root, "mbpp", "mbpp.jsonl")):
            if not lo <= r["task_id"] <= hi:
                continue
            question = f"{r['text']}\nYour code should pass this test:\n{r['test_list'][0]}\n{FENCE_REQUEST}"
            code = r["code"].replace("\r\n", "\n")
            out.append(Example(id=f"mbpp/{r['task_id']}", question=question, answer=list(r["test_list"]),
                               reference=f"```python\n{code}\n```",
                               meta={"setup": r.get("test_setup_code", "")}))
        return out

    def program(self, ex: Example, completion: str) -> str:
        return "\n\n".join([extract_code(completion), ex.meta.get("setup", ""), "\n".join(ex.answer), ""])


class HumanEval(CodeTask):
    name = "humaneval"
    splits = ("test",)

    def load(self, data_root: str | Path, split: str) -> list[Example]:
        self.check_split(split)
        return [Example(id=r["task_id"], reference=f"```python\n{r['prompt']}{r['canonical_solution']}```",
                        question=f"Complete this Python function.\n```python\n{r['prompt']}```\n{FENCE_REQUEST}",
                        answer=r["test"], meta={"prompt": r["prompt"], "entry_point": r["entry_point"]})
                for r in read_jsonl(data_file(data_root, "humaneval", "HumanEval.jsonl"))]

    def program(self, ex: Example, completion: str) -> str:
        code, prompt, entry = extract_code(completion), ex.meta["prompt"], ex.meta["entry_point"]
        if f"def {entry}" in code:  # a whole function: keep the prompt's imports and helpers in front
            head = prompt[:prompt.find(f"def {entry}")] if f"def {entry}" in prompt else prompt
            body = head + "\n" + code
        else:  # only the body: it continues the prompt
            body = prompt + code
        return f"{body}\n\n{ex.answer}\n\ncheck({entry})\n"
