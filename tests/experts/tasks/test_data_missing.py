"""Missing benchmark data is one line naming the file expected and where, not a traceback; the data root
is `--data`, else `$T2_DATA_DIR`."""
from __future__ import annotations

import pytest

from experts.eval.cli import main as eval_main
from experts.tasks import get_task
from experts.tasks.base import DataMissingError, data_root


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


def test_the_data_root_is_data_else_t2_data_dir(tmp_path, monkeypatch):
    given, env = tmp_path / "given", tmp_path / "env"
    given.mkdir(), env.mkdir()
    monkeypatch.setenv("T2_DATA_DIR", str(env))
    assert data_root(str(given)) == str(given) and data_root(None) == str(env)
    monkeypatch.delenv("T2_DATA_DIR")
    assert data_root(None) is None  # generated tasks need no data


def test_a_task_without_any_data_root_names_both_ways_to_give_one(monkeypatch):
    monkeypatch.delenv("T2_DATA_DIR", raising=False)
    with pytest.raises(DataMissingError) as e:
        get_task("gsm8k").load(data_root(None), "train")
    assert "gsm8k/train.jsonl" in str(e.value) and "--data" in str(e.value) and "T2_DATA_DIR" in str(e.value)


def test_a_t2_data_dir_that_is_not_there_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("T2_DATA_DIR", str(tmp_path / "none"))
    assert eval_main(["--task", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "none") in err and "(T2_DATA_DIR)" in err
