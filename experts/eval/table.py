"""The miniature of Transformer²'s tables (issue 6): one command evaluates every cell and writes JSON
and Markdown.

Rows: ``base`` on all six tasks; ``expert`` (each task's own SVF expert) on the three training tasks;
the pass-1 strategies ``prompt``, ``cls_expert``, ``few_shot`` on the three unseen tasks, plus their
pass-1 classification accuracy. A cell whose strategy or expert is missing says why instead of failing
the whole table.
"""
from __future__ import annotations

import logging

from experts.eval.evaluate import evaluate
from experts.eval.stats import format_cell
from experts.eval.strategies import PASS1, EvalContext, StrategyUnavailable
from experts.tasks import get_task

log = logging.getLogger("t2serve.eval")

TRAINED = ("gsm8k", "mbpp", "arc-easy")
UNSEEN = ("math500", "humaneval", "arc-challenge")
COLUMNS = TRAINED + UNSEEN
TITLES = {"gsm8k": "GSM8K", "mbpp": "MBPP", "arc-easy": "ARC-Easy", "math500": "MATH-500",
          "humaneval": "HumanEval", "arc-challenge": "ARC-Challenge"}
ROWS = (("base", COLUMNS, "base"), ("expert", TRAINED, "SVF expert of that task"), ("prompt", UNSEEN, "T² prompt"),
        ("cls_expert", UNSEEN, "T² cls-expert"), ("few_shot", UNSEEN, "T² few-shot"))


def run_table(ctx: EvalContext, *, limit: int | None = None, max_tokens: int | None = None, rows=ROWS,
              on_cell=None, done: dict | None = None, on_table=None) -> dict:
    """Every cell of ``rows``; ``on_cell(result)`` sees each full result as it finishes and
    ``on_table(table)`` the table so far after each cell (to save it: a long run that is stopped keeps
    its finished cells).

    ``done``: cells of an earlier run (``table["cells"]``) that are kept instead of recomputed (those
    that were n/a are tried again), so a long table can be filled in several commands.
    """
    cells: dict[str, dict[str, dict]] = {s: dict(r) for s, r in (done or {}).items()}
    for strategy, columns, _ in rows:
        for task_name in columns:
            if "accuracy" in cells.get(strategy, {}).get(task_name, {}):
                continue
            try:
                res = evaluate(ctx, get_task(task_name).seeded(ctx.seed), strategy, limit=limit, max_tokens=max_tokens)
            except StrategyUnavailable as e:
                log.warning("%s on %s: %s", strategy, task_name, e)
                cells.setdefault(strategy, {})[task_name] = {"error": str(e)}
                continue
            if on_cell:
                on_cell(res)
            cells.setdefault(strategy, {})[task_name] = {k: v for k, v in res.items() if k != "samples"}
            log.info("%s / %s: %s", strategy, task_name, format_cell(res))
            if on_table:
                on_table(_table(cells))
    return _table(cells)


def _table(cells: dict) -> dict:
    return {"columns": list(COLUMNS), "rows": [r[0] for r in ROWS if r[0] in cells], "cells": cells}


def markdown(table: dict) -> str:
    cols = table["columns"]
    lines = ["| | " + " | ".join(TITLES.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    labels = {r[0]: r[2] for r in ROWS}
    for strategy in table["rows"]:
        row = table["cells"].get(strategy, {})
        cells = " | ".join(format_cell(row.get(c)) for c in cols)
        lines.append(f"| {labels.get(strategy, strategy)} | {cells} |")
    pass1 = [(s, c, table["cells"][s][c]["pass1"]) for s in PASS1 for c in cols
             if "pass1" in table["cells"].get(s, {}).get(c, {})]
    if pass1:
        lines += ["", "Pass-1 classification accuracy (chosen category = the task's category):", "",
                  "| strategy | task | accuracy | chosen |", "|---|---|---|---|"]
        for s, c, p in pass1:
            lines.append(f"| {labels.get(s, s)} | {TITLES.get(c, c)} | {format_cell(p)} | {p.get('chosen')} |")
    missing = [f"- {labels.get(s, s)} on {TITLES.get(c, c)}: {cell['error']}"
               for s in table["rows"] for c, cell in table["cells"].get(s, {}).items() if cell.get("error")]
    if missing:
        lines += ["", "Not evaluated (n/a):", *missing]
    lines += ["", "Accuracy in percent, [95% Wilson interval], n = examples (held-out test halves)."]
    return "\n".join(lines)
