"""Missing benchmark data is one line naming the file expected and where, not a traceback."""
from __future__ import annotations

import pytest

from experts.eval.cli import main as eval_main
from experts.tasks import get_task
from experts.tasks.base import DataMissingError


@pytest.mark.parametrize("task, expected", [("gsm8k", "gsm8k/train.jsonl"), ("arc-easy", "arc/ARC-Easy-Train.jsonl"),
                                            ("mbpp", "mbpp/mbpp.jsonl")])
def test_a_task_names_the_file_it_expects(task, expected, tmp_path):
    with pytest.raises(DataMissingError) as e:
        get_task(task).load(tmp_path, "train")
    assert expected in str(e.value) and "Benchmark data" in str(e.value)


def test_the_eval_command_says_it_in_one_line_with_exit_2(tmp_path, capsys):
    assert eval_main(["--task", "gsm8k", "--data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m experts.eval: error: no data root at") and len(err.splitlines()) == 1
