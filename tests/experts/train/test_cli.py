"""`t2serve train` and `t2serve eval` end to end on the tiny model: flags reach the config, the expert
goes to the store, eval reads it back and writes JSON + Markdown."""
from __future__ import annotations

import json

import pytest

from server.cli import main
from tests.support.train_data import write_all


@pytest.mark.usefixtures("isolation")
def test_train_then_eval(tiny_llama_dir, tmp_path, capsys):
    data, cache, store = write_all(tmp_path / "data"), tmp_path / "cache", tmp_path / "store"
    common = ["--data", str(data), "--model", str(tiny_llama_dir), "--cache-dir", str(cache), "--device", "cpu"]
    assert main(["train", "svf", "--task", "arc-easy", *common, "--run-dir", str(tmp_path / "run"), "--store",
                 str(store), "--batch-size", "2", "--max-steps", "1", "--max-tokens", "4", "--train-limit", "2",
                 "--objective", "next_token", "--targets", "mlp"]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["batch_size"] == 2 and cfg["objective"] == "next_token" and cfg["lr"] == 2e-3 and cfg["clip"] == 1e-3
    assert (store / "arc-easy").is_dir()
    out = tmp_path / "out"
    assert main(["eval", "--task", "arc-easy", "--strategy", "expert", "--store", str(store), *common,
                 "--max-tokens", "4", "--out", str(out)]) == 0
    res = json.loads((out / "arc-easy-expert.json").read_text())
    assert res["n"] == 2 and res["strategy"] == "expert"
    assert "| arc-easy | expert |" in capsys.readouterr().out
    assert len((out / "arc-easy-expert.samples.jsonl").read_text().splitlines()) == 2
    expert_file = tmp_path / "run" / "expert.safetensors"
    assert main(["eval", "--table", "--limit", "1", "--max-tokens", "2", "--expert", f"mbpp={expert_file}", *common,
                 "--out", str(out), "--shots", "1", "--cem-population", "2", "--cem-generations", "1"]) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["cells"]["expert"]["mbpp"]["n"] == 1 and "error" in table["cells"]["expert"]["gsm8k"]
    assert (out / "table.md").read_text().startswith("| | GSM8K | MBPP |")
    # Filling a table in parts: cells already there are kept, the rows asked for are (re)computed.
    table["cells"]["base"]["gsm8k"]["correct"] = -1  # a marker: kept, not recomputed
    (out / "table.json").write_text(json.dumps(table))
    assert main(["eval", "--table", "--rows", "base", "--limit", "1", "--max-tokens", "2", *common,
                 "--out", str(out)]) == 0
    again = json.loads((out / "table.json").read_text())
    assert again["cells"]["base"]["gsm8k"]["correct"] == -1 and "expert" in again["cells"]
