"""The miniature's report: acceptance verdicts and the table read from the cells, never assumed."""
from __future__ import annotations

from experts.eval.miniature import LORA, markdown, verdicts
from experts.eval.stats import accuracy_cell


def cells(expert_correct: int, few_shot_correct: int) -> dict:
    base = {t: accuracy_cell(50, 500) for t in ("mini-mul", "mini-add", "mini-last", "mini-add2", "mini-first",
                                                 "mini-muladd")}
    out = {"base": base, f"expert {LORA}": {"mini-mul": {"error": "not trained"}}}
    out["expert reinforce-mlp"] = {t: accuracy_cell(expert_correct, 500) for t in ("mini-mul", "mini-add", "mini-last")}
    for row, k in (("prompt", 60), ("cls_expert", 70), ("few_shot", few_shot_correct)):
        out[row] = {t: accuracy_cell(k, 500) for t in ("mini-add2", "mini-first", "mini-muladd")}
    return out


def test_an_expert_beats_base_only_beyond_its_interval():
    assert all(verdicts(cells(90, 90))["experts_beyond_base"].values())
    assert not any(verdicts(cells(60, 90))["experts_beyond_base"].values())  # 12% vs 10%: inside the intervals
    assert "expert lora-next-token mini-mul" not in verdicts(cells(90, 90))["experts_beyond_base"]  # n/a cell


def test_the_unseen_ordering_is_checked_cell_by_cell():
    good = verdicts(cells(90, 90))["unseen_ordering"]["mini-add2"]
    assert good["few_shot>=cls_expert>=prompt>=base"] and good["few_shot_beyond_base"]
    bad = verdicts(cells(90, 65))["unseen_ordering"]["mini-add2"]
    assert not bad["few_shot>=cls_expert>=prompt>=base"] and not bad["few_shot_beyond_base"]


def test_the_table_has_a_row_per_strategy_and_marks_missing_cells():
    text = markdown(cells(90, 90), {})
    assert text.splitlines()[0].startswith("| strategy | mini-mul |")
    assert "| expert reinforce-mlp | 18.0 [" in text and "| few_shot |" in text
    assert f"| expert {LORA} | n/a |" in text


def test_a_real_benchmark_gets_its_column_and_verdict_when_scored():
    c = cells(90, 90)
    assert "arc-easy-text" not in markdown(c, {})
    c["base"]["arc-easy-text"] = accuracy_cell(262, 1240)  # 21.1%
    c["expert reinforce-mlp"]["arc-easy-text"] = accuracy_cell(372, 1240)  # 30.0%
    assert "| mini-bracket | arc-easy-text | mini-add2 |" in markdown(c, {}).splitlines()[0]
    assert verdicts(c)["experts_beyond_base"]["reinforce-mlp arc-easy-text"]
    c["expert reinforce-mlp"]["arc-easy-text"] = accuracy_cell(280, 1240)  # 22.6%: inside base's interval
    assert not verdicts(c)["experts_beyond_base"]["reinforce-mlp arc-easy-text"]


def test_a_scored_cell_is_kept_only_for_the_same_settings(tmp_path):
    import json

    from experts.eval.miniature import _relocated, kept_cell

    path = tmp_path / "few_shot.mini-add2.json"
    assert kept_cell(path, {"seed": 0}, redo=False) is None  # never scored
    path.write_text(json.dumps({"accuracy": 0.5, "settings": {"seed": 0, "cem_generations": 8}}))
    assert kept_cell(path, {"seed": 0, "cem_generations": 8}, redo=False)["accuracy"] == 0.5
    assert kept_cell(path, {"seed": 0, "cem_generations": 20}, redo=False) is None  # other settings: scored again
    assert kept_cell(path, {"seed": 1, "cem_generations": 8}, redo=False) is None  # a fresh test draw
    assert kept_cell(path, {"seed": 0, "cem_generations": 8}, redo=True) is None  # --redo
    # a run folder moved from another machine: its files are found where the folder is now
    (tmp_path / "expert.safetensors").write_bytes(b"")
    moved = _relocated({"expert_file": "/elsewhere/runs/x/expert.safetensors"}, tmp_path, "expert_file")
    assert moved["expert_file"] == str(tmp_path / "expert.safetensors")
    here = {"expert_file": str(tmp_path / "expert.safetensors")}
    assert _relocated(dict(here), tmp_path / "other", "expert_file") == here


def test_a_classifier_run_is_kept_only_for_the_categories_it_learnt(tmp_path):
    import json

    from experts.eval.miniature import kept_run

    run = tmp_path / "runs" / "classifier" / "mini-cls"
    assert not kept_run(run, ("a", "b"))  # never trained
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    assert kept_run(run)  # an expert's run: kept once finished
    (run / "categories.json").write_text(json.dumps(["a", "b"]))
    assert kept_run(run, ("a", "b"))
    assert not kept_run(run, ("a", "b", "c")) and not run.exists()  # another suite: removed, trained again
