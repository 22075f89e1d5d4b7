"""``train sapt --compare``: the whole comparison on one task sequence, for each seed, in one run:
SAPT, SAPT without ARM, SeqLoRA (one LoRA trained on the tasks in turn) and each task's LoRA trained
alone (ã_j, for FWT). Prints the metrics table (mean and per seed) and writes under ``--out``:
``sapt_compare.json`` (config, a_{i,j} per method and seed, metrics, attention, timings),
``sapt_compare.md`` (tables and matrices) and ``sapt_attention.png`` (routing on each task's test
inputs after the last task, SAPT next to SAPT without ARM, first seed).

Shared work, exact by construction (every random choice is seeded by seed and task position):
SAPT without ARM branches from SAPT after the first task (ARM has nothing to replay before the second),
and the first task's LoRA alone is SeqLoRA after its first task. SAPT's last task needs no pseudo-inputs.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from experts.sapt.config import SAPTConfig
from experts.sapt.learner import SequenceLearner
from experts.sapt.metrics import all_metrics, lower_triangle
from experts.sapt.progress import SAPTLog
from experts.sapt.report import LABELS, matrix_markdown, metrics_table, plot_attention, summarize
from experts.sapt.run import load_model, setup, store_bundle
from experts.train.memory import peak_gpu_mb, peak_rss_mb

log = logging.getLogger("t2serve.sapt")
METHOD_ORDER = ("sapt", "sapt_noarm", "seqlora")


def _learn_all(learner: SequenceLearner, tasks: list[str], start: int = 0, on_task=None) -> None:
    for i in range(start, len(tasks)):
        learner.learn(tasks[i], i, make_pseudo=i < len(tasks) - 1)
        learner.evaluate(tasks[:i + 1])
        if on_task:
            on_task(i)


def compare_seed(cfg: SAPTConfig, base, pool, evaluator, runlog) -> dict:
    """All methods for ``cfg.seed``: {"methods": {method: {matrix, metrics, attention, seconds}}, "alone"}."""
    tasks = cfg.task_list
    learners, seconds, branch = {}, {}, {}
    make = lambda method, **kw: SequenceLearner(replace(cfg, method=method, **kw), base, pool, evaluator,  # noqa: E731
                                                on_record=runlog.write)
    t0 = time.perf_counter()
    learners["sapt"] = make("sapt")

    def keep_first(i: int) -> None:
        if i == 0:
            branch["after_first"] = learners["sapt"].snapshot()

    _learn_all(learners["sapt"], tasks, on_task=keep_first)
    seconds["sapt"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    learners["sapt_noarm"] = make("sapt_noarm").restore(branch["after_first"])
    _learn_all(learners["sapt_noarm"], tasks, start=1)
    seconds["sapt_noarm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    learners["seqlora"] = make("seqlora")
    _learn_all(learners["seqlora"], tasks)
    seconds["seqlora"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    alone = [learners["seqlora"].rows[0][tasks[0]]]
    for j in range(1, len(tasks)):
        single = make("single")
        single.learn(tasks[j], j, make_pseudo=False)
        alone.append(single.evaluate([tasks[j]])[tasks[j]])
    seconds["single"] = time.perf_counter() - t0

    out = {"seed": cfg.seed, "alone": dict(zip(tasks, alone)), "alone_seconds": round(seconds["single"], 1),
           "methods": {}}
    for method in METHOD_ORDER:
        lr = learners[method]
        out["methods"][method] = {
            "matrix": lr.rows, "metrics": all_metrics(lower_triangle(lr.rows, tasks), alone),
            "attention": lr.attention[-1], "attention_per_stage": lr.attention, "seconds": round(seconds[method], 1)}
    out["bundle"] = learners["sapt"].bundle
    return out


def run_compare(cfg: SAPTConfig, seeds: list[int], out_dir: str | Path, base=None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = base or load_model(cfg)
    pool, evaluator = setup(cfg, base)
    runlog = SAPTLog(out)
    tasks = cfg.task_list
    runs = []
    for k, seed in enumerate(seeds):
        t0 = time.perf_counter()
        run = compare_seed(replace(cfg, seed=seed), base, pool, evaluator, runlog)
        bundle = run.pop("bundle")
        if k == 0 and cfg.store:
            run["stored"] = store_bundle(replace(cfg, seed=seed), base, bundle, tasks)
        run["seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(run)
        log.info("seed %d done in %.0f s", seed, run["seconds"])
    summary = summarize([{m: r["methods"][m]["metrics"] for m in METHOD_ORDER} for r in runs])
    table = metrics_table(summary, seeds)
    md = [f"# SAPT continual learning: {' -> '.join(tasks)}", "", table, ""]
    for r in runs:
        for m in METHOD_ORDER:
            md += [matrix_markdown(r["methods"][m]["matrix"], tasks, f"{LABELS[m]}, seed {r['seed']}: a_ij (%)"), ""]
        md += [f"LoRA alone, seed {r['seed']}: " + ", ".join(f"{t} {100 * v:.1f}" for t, v in r["alone"].items()), ""]
    heatmap = out / "sapt_attention.png"
    panels = {LABELS[m]: runs[0]["methods"][m]["attention"] for m in ("sapt", "sapt_noarm")}
    drew = plot_attention(panels, tasks, heatmap)
    result = {"tasks": tasks, "seeds": seeds, "config": json.loads(cfg.to_json()), "runs": runs, "summary": summary,
              "heatmap": str(heatmap) if drew else None, "seconds": round(time.perf_counter() - t_start, 1),
              "device": str(base.device), "dtype": str(base.dtype), "peak_rss_mb": round(peak_rss_mb(), 1),
              "peak_gpu_mb": None if (gpu := peak_gpu_mb(base.device)) is None else round(gpu, 1)}
    (out / "sapt_compare.json").write_text(json.dumps(result, indent=1))
    (out / "sapt_compare.md").write_text("\n".join(md))
    print("\n" + table + "\n")
    print(f"a_ij matrices: {out / 'sapt_compare.md'}; JSON: {out / 'sapt_compare.json'}")
    print(f"attention heat map: {heatmap}" if drew else "attention heat map: skipped (matplotlib missing)")
    print(f"peak RSS {result['peak_rss_mb']:.0f} MiB, peak GPU {result['peak_gpu_mb'] or 0:.0f} MiB")
    return result

