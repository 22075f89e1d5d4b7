"""Evaluation: Wilson intervals, one cell with base and expert strategies on a tiny model, the whole
table with pass-1 strategies missing (marked, not fatal) or registered (classification accuracy)."""
from __future__ import annotations

import pytest
import torch

from adapters import Adaptation, SVFExpert
from adapters.svf import init_z
from experts.eval import strategies
from experts.eval.evaluate import evaluate
from experts.eval.stats import format_cell, wilson
from experts.eval.strategies import EvalContext, StrategyUnavailable
from experts.eval.table import ROWS, markdown, run_table
from experts.tasks import get_task
from experts.train.model import load_base
from experts.train.rollout import make_engine
from tests.support.train_data import write_all


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) == (0.0, 1.0)
    assert format_cell({"accuracy": 0.5, "ci95": [lo, hi], "n": 10}) == "50.0 [23.7, 76.3] n=10"


@pytest.fixture(scope="module")
def ctx(tiny_llama_dir, tmp_path_factory):
    base = load_base(str(tiny_llama_dir), device="cpu", dtype="float32", cache_dir=tmp_path_factory.mktemp("c"))
    g = torch.Generator().manual_seed(0)
    expert = SVFExpert("arc-easy", {t.name: init_z(t.rank, "sakana", g) for t in base.runtime.targets})
    data = write_all(tmp_path_factory.mktemp("data"))
    return EvalContext(base, make_engine(base, 4, 768), {"arc-easy": expert}, {"arc-easy": "reasoning"},
                       {"arc-easy": "arc-easy"}, str(data))


def test_one_cell_base_and_expert(ctx):
    task = get_task("arc-easy")
    res = evaluate(ctx, task, "base", max_tokens=4)
    assert res["n"] == 2 and 0 <= res["accuracy"] <= 1 and len(res["ci95"]) == 2
    assert len(res["samples"]) == 2 and {"id", "correct", "parsed", "reply"} <= set(res["samples"][0])
    assert evaluate(ctx, task, "expert", max_tokens=4)["n"] == 2
    with pytest.raises(StrategyUnavailable):
        evaluate(ctx, get_task("gsm8k"), "expert", max_tokens=4)


def short_replies(monkeypatch):
    for name in ("gsm8k", "mbpp", "humaneval", "arc-easy", "arc-challenge", "math500"):
        monkeypatch.setattr(get_task(name), "max_tokens", 4)


@pytest.mark.usefixtures("isolation")
def test_table_with_pass1_strategies(ctx, monkeypatch):
    short_replies(monkeypatch)
    table = run_table(ctx, rows=[r for r in ROWS if r[0] != "expert"])
    cells = table["cells"]
    assert set(cells["base"]) == set(table["columns"]) and all("accuracy" in c for c in cells["base"].values())
    for task in ("math500", "humaneval", "arc-challenge"):  # prompt: the real dispatcher, over "reasoning"/"other"
        p1 = cells["prompt"][task]["pass1"]
        assert p1["n"] == cells["prompt"][task]["n"] and set(p1["chosen"]) <= {"reasoning", "other"}
    assert "classifier" in cells["cls_expert"]["math500"]["error"]  # no classifier expert loaded
    assert "two trained task experts" in cells["few_shot"]["humaneval"]["error"]
    text = markdown(table)
    assert "| base |" in text and "| n/a |" in text and "Pass-1 classification" in text
    assert "- T² cls-expert on MATH-500: cls_expert needs" in text


def test_few_shot_mixes_the_task_experts_and_never_scores_its_shots(ctx, monkeypatch):
    short_replies(monkeypatch)
    arc = ctx.experts["arc-easy"]
    other = SVFExpert("gsm8k", {n: -v for n, v in arc.z.items()})
    few = EvalContext(ctx.base, ctx.engine, {"arc-easy": arc, "gsm8k": other},
                      {"arc-easy": "reasoning", "gsm8k": "math"}, {"arc-easy": "arc-easy", "gsm8k": "gsm8k"}, ctx.data,
                      options={"shots": 1, "cem_population": 4, "cem_generations": 2})
    res = evaluate(few, get_task("math500"), "few_shot")  # no train split: the shot is the last test example
    assert res["held_out"] == 1 and res["n"] == 1 and res["notes"]["experts"] == ["gsm8k", "arc-easy"]
    assert res["samples"][0]["id"] == "test/prealgebra/1.json"  # the other one, never graded
    assert evaluate(few, get_task("math500"), "few_shot", limit=1)["held_out"] == 0  # the shot is outside
    assert len(res["notes"]["alpha"]) == 2 and all(0 <= a <= 1 for a in res["notes"]["alpha"])
    res = evaluate(few, get_task("arc-challenge"), "few_shot")  # shots from its train split: all test scored
    assert res["held_out"] == 0 and res["n"] == 2


def test_expert_adaptation_is_used(ctx):
    res = strategies.get_strategy("expert")(ctx, get_task("arc-easy"), get_task("arc-easy").load(ctx.data, "test"))
    assert all(isinstance(a, Adaptation) and a.svf.experts[0].name == "arc-easy" for a in res.adaptations)
