"""``train sapt``: learn a task sequence with one method, checkpoint after every task, evaluate the
a_{i,j} rows, and put the resulting bundle in the expert store (the server's ``sapt`` strategy serves it).

Outputs in the run directory: ``bundle.safetensors`` (the store's SAPT layout; metadata: tasks and LoRA
alpha), ``matrix.json`` / ``matrix.md`` (scores and metrics), ``attention.png`` (routing after the last
task), ``log.jsonl`` and ``curves.png`` (loss per step), ``config.json``, ``checkpoint.json``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from safetensors.torch import save as st_save

from adapters.atomic import atomic_write
from experts.sapt import checkpoint
from experts.sapt.config import SAPTConfig
from experts.sapt.data import TaskPool
from experts.sapt.evaluate import Evaluator
from experts.sapt.learner import SequenceLearner
from experts.sapt.metrics import all_metrics, lower_triangle
from experts.sapt.progress import SAPTLog
from experts.sapt.report import LABELS, matrix_markdown, metrics_table, plot_attention, summarize
from experts.store.sapt_tensors import bundle_tensors
from experts.train.runlog import CURVES_NAME, plot_curves

log = logging.getLogger("t2serve.sapt")
BUNDLE_FILE = "bundle.safetensors"


def load_model(cfg: SAPTConfig):
    """The base model with adaptive layers on the LoRA targets only (fewer layers to route through)."""
    from experts.train.model import load_base

    return load_base(cfg.model, device=cfg.device, dtype=cfg.dtype, targets=cfg.target_patterns,
                     cache_dir=cfg.cache_dir, threads=cfg.threads)


def setup(cfg: SAPTConfig, base):
    pool = TaskPool(base.tokenizer, cfg.data, cfg.train_limit, cfg.val_limit, cfg.test_limit)
    return pool, Evaluator(base, cfg.max_num_seqs)


def _resume_state(cfg: SAPTConfig, run_dir: Path, resume: bool):
    found = checkpoint.load(run_dir)
    if found is None:
        return None
    if not resume:
        raise FileExistsError(f"{run_dir} holds a checkpoint: pass --resume to continue it (a longer --tasks "
                              "list continues the sequence), or choose another --run-dir")
    snap, old = found
    diff = cfg.recipe_mismatch(SAPTConfig.from_dict(old))
    if diff:
        raise ValueError(f"cannot resume {run_dir}: the recipe differs in {', '.join(diff)}")
    if cfg.task_list[:len(snap["learned"])] != snap["learned"]:
        raise ValueError(f"cannot resume {run_dir}: it learned {','.join(snap['learned'])}, and --tasks must "
                         "start with those tasks in that order")
    return snap


def train_sequence(cfg: SAPTConfig, base=None, *, resume: bool = False) -> dict:
    run_dir = Path(cfg.run_dir or f"runs/{cfg.name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    snap = _resume_state(cfg, run_dir, resume)
    base = base or load_model(cfg)
    pool, evaluator = setup(cfg, base)
    runlog = SAPTLog(run_dir, snap["global_step"] if snap else None)
    (run_dir / "config.json").write_text(cfg.to_json())
    learner = SequenceLearner(cfg, base, pool, evaluator, on_record=runlog.write)
    if snap:
        learner.restore(snap)
        log.info("resumed %s after %s", run_dir, ",".join(learner.learned))
    tasks, t0 = cfg.task_list, time.perf_counter()
    for i, name in enumerate(tasks):
        if i < len(learner.learned):
            continue
        learner.learn(name, i)
        if cfg.eval_every_task:
            learner.evaluate(tasks[:i + 1])
        checkpoint.save(run_dir, learner.snapshot(), json.loads(cfg.to_json()))
    return finish(cfg, base, learner, run_dir, time.perf_counter() - t0, runlog.records)


def finish(cfg: SAPTConfig, base, learner: SequenceLearner, run_dir: Path, seconds: float, records: list[dict]
           ) -> dict:
    tasks = learner.learned
    meta = {"kind": "sapt", "name": cfg.name, "tasks": ",".join(tasks), "lora_alpha": str(cfg.lora_alpha),
            "method": cfg.method}
    atomic_write(run_dir / BUNDLE_FILE, st_save(bundle_tensors(learner.bundle), metadata=meta))
    summary = {"name": cfg.name, "method": cfg.method, "tasks": tasks, "seconds": round(seconds, 1),
               "bundle_file": str(run_dir / BUNDLE_FILE), "stored": None}
    if len(learner.rows) == len(tasks):
        a = lower_triangle(learner.rows, tasks)
        summary.update(matrix=learner.rows, metrics=all_metrics(a), attention=learner.attention[-1])
        md = [metrics_table(summarize([{cfg.method: summary["metrics"]}]), [cfg.seed]), "",
              matrix_markdown(learner.rows, tasks, f"{LABELS[cfg.method]}, seed {cfg.seed}: a_ij (%)")]
        (run_dir / "matrix.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
        if learner.attention[-1] and plot_attention({LABELS[cfg.method]: learner.attention[-1]}, tasks,
                                                    run_dir / "attention.png"):
            summary["heatmap"] = str(run_dir / "attention.png")
            print(f"attention heat map: {summary['heatmap']}")
    if cfg.store and cfg.routed:
        summary["stored"] = store_bundle(cfg, base, learner.bundle, tasks)
    # the loss of every step, and the mean score on the tasks learned so far after each task
    curves = [r for r in records if r["event"] == "step"] + [
        {"event": "val", "step": r["step"], "val_acc": sum(r["scores"].values()) / len(r["scores"])}
        for r in records if r["event"] == "eval"]
    plot_curves(curves, run_dir / CURVES_NAME)
    (run_dir / "matrix.json").write_text(json.dumps(summary, indent=1))
    return summary


def store_bundle(cfg: SAPTConfig, base, bundle, tasks: list[str]) -> str:
    from experts.store.validation import ExpertDraft
    from experts.store.expert_file import put_draft

    desc = (f"SAPT bundle ({cfg.method}): LoRA r={cfg.rank} on {cfg.lora_targets} for tasks "
            f"{', '.join(tasks)} (block i = task i), {cfg.steps} steps per task, seed {cfg.seed}")
    draft = ExpertDraft(name=cfg.name, kind="sapt", tensors=bundle_tensors(bundle), description=desc[:1000],
                        lora_alpha=cfg.lora_alpha, source="training")
    where = put_draft(Path(cfg.store), base, draft)
    log.info("stored the bundle as %s", where)
    return where
