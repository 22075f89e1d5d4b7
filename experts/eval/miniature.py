"""The Transformer² loop in miniature, one command: train SVF experts on the generated tasks within the
embedded model's reach (``experts/tasks/miniature.py``), then score every strategy with 95% Wilson
intervals, and write the JSON, the learning curves and the Markdown table.

    python -m experts.eval.miniature [--out results/miniature] [--steps 40] [--batch 64]
    python -m experts.eval.miniature --quick --out /tmp/mini     the whole pipeline in minutes on a CPU

Runs (each skipped when its run folder already holds a summary, so a stopped run resumes):
- ``reinforce-mlp``: SVF on the MLP matrices with REINFORCE (the paper's recipe), one expert per trained task;
  rewards are taken against the batch mean (``--baseline``); rollouts are sampled, except for the format task,
  whose sampled replies earned no reward (``ROLLOUTS``, ``--rollout``);
- ``reinforce-all``: the same on every linear matrix (MLP + attention);
- ``next-token-mlp``: the MLP experts trained on the reference replies instead (the paper's ablation);
- ``classifier``: the classifier expert on ``mini-cls`` (which skill a request needs), next-token on the labels;
  trained again when the suite's categories change (a kept run records the ones it learnt);
- ``lora-next-token``: a LoRA of rank 1 on q_proj and v_proj (57,600 parameters on SmolLM2, against SVF's
  51,840 on the MLP) trained on the reference replies, as the paper's LoRA baseline is.

With ``--data DIR`` (the benchmark data root, docs/training.md) a real benchmark joins: ARC-Easy with the
choices answered in their own words (``arc-easy-text``), a ``reinforce-mlp`` expert trained on it with greedy
rollouts (``--real-steps``, ``--real-batch``), base and expert scored on its whole test split (1,240 questions).

Cells: base on every task; each expert on its own task; on the unseen tasks, pass 1 by prompt, by the
classifier expert and by few-shot CEM over the ``reinforce-mlp`` experts. ``--seed`` draws a fresh test set.
Scored cells are kept while their settings match; pass 1's cells and ``mini-cls`` also record the categories.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger("t2serve.miniature")

RUNS = (  # label, targets, objective
    ("reinforce-mlp", "mlp", "reinforce"),
    ("reinforce-all", "all", "reinforce"),
    ("next-token-mlp", "mlp", "next_token"),
)
LORA = "lora-next-token"
# REINFORCE rollouts per task (--rollout overrides): sampled at temperature 1 by default (greedy ones left
# mini-last at 9-11% in 12 steps of 32 on the CPU, sampled ones reached 19% by step 8); greedy for the format
# task, whose sampled replies at temperature 1 earned no reward in steps 2-4 (0 of 32 each; greedy: 6%, 25%,
# 38% of the batch at steps 1-3)
ROLLOUTS = {"mini-bracket": "greedy"}
# A real benchmark (--data): its expert is REINFORCE on the MLP. Greedy rollouts: sampled at temperature 1, 3-9%
# of replies on arc-easy-text committed to the right choice (greedy: 16-26%), so most steps saw no reward.
REAL = ("arc-easy-text",)
REAL_MAX_TOKENS = 32
REAL_LR = 5e-3  # the recipe that moved it on the CPU (docs/results/cpu/arc-easy-text/)


def real_tasks(args) -> tuple[str, ...]:
    return REAL if getattr(args, "data", None) else ()


def _progress(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def _relocated(summary: dict, run_dir: Path, key: str) -> dict:
    """A kept run's file, found in its run folder when the folder moved (a GPU run's results copied here)."""
    if key in summary and not Path(summary[key]).exists():
        summary[key] = str(run_dir / Path(summary[key]).name)
    return summary


def kept_run(run_dir: Path, categories: tuple[str, ...] | None = None) -> bool:
    """Whether a finished run is reused. A classifier run (``categories`` given) is reused only when it learnt
    these categories; one trained for another suite is removed, so that it is trained again."""
    if not (run_dir / "summary.json").exists():
        return False
    if categories is None:
        return True
    learnt = run_dir / "categories.json"
    if learnt.exists() and json.loads(learnt.read_text()) == list(categories):
        return True
    shutil.rmtree(run_dir)
    return False


def train(args, out: Path, t0: float) -> dict[str, dict[str, dict]]:
    """label -> task -> the training summary (its expert file among it)."""
    from experts.tasks.miniature import CATEGORIES, TRAINED
    from experts.train.config import TrainConfig
    from experts.train.model import load_base
    from experts.train.trainer import SVFTrainer

    plan = [(label, targets, objective, task) for label, targets, objective in RUNS for task in TRAINED]
    plan += [("reinforce-mlp", "mlp", "reinforce", task) for task in real_tasks(args)]
    # The classifier learns from the labels (next-token): the base model answers the question inside the
    # \boxed{} of the classification prompt instead of naming a category (0% of greedy replies), so REINFORCE
    # with greedy rollouts would never see a reward.
    plan.append(("classifier", "mlp", "next_token", "mini-cls"))
    summaries: dict[str, dict[str, dict]] = {}
    bases: dict[str, object] = {}
    for i, (label, targets, objective, task) in enumerate(plan):
        run_dir = out / "runs" / label / task
        done = run_dir / "summary.json"
        if kept_run(run_dir, CATEGORIES if label == "classifier" else None):
            summaries.setdefault(label, {})[task] = _relocated(json.loads(done.read_text()), run_dir, "expert_file")
            _progress(f"train {i + 1}/{len(plan)} {label} {task}: kept ({done})", t0)
            continue
        if targets not in bases:
            bases.clear()  # one base model in memory at a time
            bases[targets] = load_base(args.model, device=args.device, targets=targets, cache_dir=args.cache_dir)
        _progress(f"train {i + 1}/{len(plan)} {label} {task} ...", t0)
        real = task in REAL
        steps = (args.real_steps or args.steps) if real else args.steps
        cfg = TrainConfig(task=task, data=args.data if real else str(out), run_dir=str(run_dir), targets=targets,
                          objective=objective, batch_size=(args.real_batch or args.batch) if real else args.batch,
                          max_steps=steps, epochs=max(1, steps), val_every=args.val_every, val_limit=args.val_limit,
                          micro_batch=args.micro_batch, lr=(args.real_lr or REAL_LR) if real else args.lr,
                          seed=args.train_seed, device=args.device,
                          cache_dir=args.cache_dir, model=args.model,
                          rollout="greedy" if real else args.rollout or ROLLOUTS.get(task, "sample"),
                          baseline=args.baseline, max_tokens=REAL_MAX_TOKENS if real else None)
        summary = SVFTrainer(cfg, bases[targets], resume=True).run()  # a run stopped midway continues
        if label == "classifier":
            (run_dir / "categories.json").write_text(json.dumps(list(CATEGORIES)))
        summaries.setdefault(label, {})[task] = summary
        _progress(f"train {label} {task}: best val {summary['best_val']} at step {summary['best_step']} "
                  f"({summary['seconds']} s)", t0)
    bases.clear()
    summaries[LORA] = train_lora(args, out, t0)
    return summaries


def train_lora(args, out: Path, t0: float) -> dict[str, dict]:
    from experts.sapt.config import SAPTConfig
    from experts.sapt.run import load_model, train_sequence
    from experts.tasks.miniature import TRAINED

    found, base = {}, None
    for task in TRAINED:
        run_dir = out / "runs" / LORA / task
        done = run_dir / "matrix.json"
        if done.exists():
            found[task] = _relocated(json.loads(done.read_text()), run_dir, "bundle_file")
            _progress(f"train {LORA} {task}: kept ({done})", t0)
            continue
        cfg = SAPTConfig(tasks=task, run_dir=str(run_dir), method="seqlora", rank=1, lora_alpha=2.0,
                         lora_targets="q_proj,v_proj", steps=args.steps, batch_size=args.batch,
                         micro_batch=args.micro_batch, lr=args.lr, val_limit=args.val_limit, test_limit=args.val_limit,
                         seed=args.train_seed, device=args.device, cache_dir=args.cache_dir, model=args.model,
                         name=f"lora-{task}")
        base = base or load_model(cfg)
        _progress(f"train {LORA} {task} ...", t0)
        found[task] = train_sequence(cfg, base, resume=True)
        _progress(f"train {LORA} {task}: done ({found[task]['seconds']} s)", t0)
    return found


def lora_adaptation(summary: dict):
    """The one-task bundle of a LoRA run, as a request's adaptation (the task's block at weight 1)."""
    import torch
    from safetensors import safe_open

    from adapters import Adaptation
    from experts.store.sapt_tensors import bundle_from_tensors

    with safe_open(summary["bundle_file"], framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    bundle = bundle_from_tensors(tensors, float(meta["lora_alpha"]), f"lora@{summary['bundle_file']}")
    return Adaptation.sapt_weights(bundle, torch.ones(1), label="lora")


def kept_cell(path: Path, settings: dict, redo: bool) -> dict | None:
    """A scored cell to reuse: it exists, was scored with the same settings, and its row is not redone."""
    if redo or not path.exists():
        return None
    res = json.loads(path.read_text())
    return res if res.get("settings") == settings else None


def evaluate_all(args, out: Path, trained: dict, t0: float) -> dict:
    from experts.eval.evaluate import evaluate
    from experts.eval.strategies import EvalContext, StrategyUnavailable
    from experts.tasks import get_task
    from experts.tasks.miniature import CATEGORIES, TRAINED, UNSEEN
    from experts.train.model import load_base
    from experts.store.expert_file import read_expert_file
    from experts.train.rollout import make_engine

    cells: dict[str, dict[str, dict]] = {}
    # A cell is kept (resumed) when it was scored with the same settings, unless its row is in --redo.
    redo = set(filter(None, (args.redo or "").split(",")))
    cem_settings = {"shots": args.shots, "cem_population": args.cem_population, "cem_generations": args.cem_generations,
                    "few_shot_fitness": args.few_shot_fitness}
    for targets in ("mlp", "all"):
        base = load_base(args.model, device=args.device, targets=targets, cache_dir=args.cache_dir)
        experts, categories = {}, {}
        labels = [label for label, t, _ in RUNS if t == targets]
        slots = args.max_num_seqs or (256 if base.device.type == "cuda" else 16)
        engine = make_engine(base, slots, 512)

        def cell(row: str, task_name: str, strategy: str, ctx) -> None:
            kept = out / "cells" / f"{row}.{task_name}.json"
            limit = args.real_limit if task_name in REAL else args.limit  # a real benchmark: its whole test split
            settings = {"seed": args.seed, "limit": limit, **(cem_settings if strategy == "few_shot" else {})}
            if strategy in ("prompt", "cls_expert", "few_shot") or task_name == "mini-cls":
                settings["categories"] = list(CATEGORIES)  # pass 1's choices: scored again when the suite changes
            res = kept_cell(kept, settings, row in redo)
            if res is not None:
                cells.setdefault(row, {})[task_name] = res
                _progress(f"eval {row} on {task_name}: kept ({kept})", t0)
                return
            task = get_task(task_name).seeded(args.seed)
            try:
                res = evaluate(ctx, task, strategy, limit=limit)
            except StrategyUnavailable as e:
                cells.setdefault(row, {})[task_name] = {"error": str(e)}
                return
            samples = res.pop("samples")
            (out / "samples").mkdir(exist_ok=True)
            (out / "samples" / f"{row}.{task_name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
            res["settings"] = settings
            kept.parent.mkdir(exist_ok=True)
            kept.write_text(json.dumps(res, indent=1))
            cells.setdefault(row, {})[task_name] = res
            _progress(f"eval {row} on {task_name}: {100 * res['accuracy']:.1f}% "
                      f"[{100 * res['ci95'][0]:.1f}, {100 * res['ci95'][1]:.1f}] n={res['n']}", t0)

        for label in labels:
            for task_name in TRAINED + (real_tasks(args) if label == "reinforce-mlp" else ()):
                expert, meta = read_expert_file(trained[label][task_name]["expert_file"])
                name = f"{label}:{task_name}"
                experts[name], categories[name] = expert, meta.get("category", "other")
                ctx = EvalContext(base, engine, {name: expert}, {name: categories[name]}, {task_name: name},
                                  args.data if task_name in REAL else str(out), args.seed)
                cell(f"expert {label}", task_name, "expert", ctx)
        if targets != "mlp":  # the LoRA ablation: q_proj and v_proj are adapted layers of this base
            from experts.eval.strategies import StrategyResult, register_strategy

            for task_name in TRAINED:
                adaptation = lora_adaptation(trained[LORA][task_name])
                register_strategy("lora", lambda c, t, e, a=adaptation: StrategyResult([a] * len(e)))
                cell(f"expert {LORA}", task_name, "lora", EvalContext(base, engine, {}, {}, {}, str(out), args.seed))
            continue
        ctx = EvalContext(base, engine, {}, {}, {}, str(out), args.seed)
        for task_name in TRAINED + UNSEEN + ("mini-cls",):
            cell("base", task_name, "base", ctx)
        for task_name in real_tasks(args):
            cell("base", task_name, "base", EvalContext(base, engine, {}, {}, {}, args.data, args.seed))
        # pass 1 over the REINFORCE MLP experts (and the classifier expert for cls_expert)
        chosen = {f"reinforce-mlp:{t}": experts[f"reinforce-mlp:{t}"] for t in TRAINED}
        cls_expert, meta = read_expert_file(trained["classifier"]["mini-cls"]["expert_file"])
        pool = {**chosen, "classifier": cls_expert}
        cats = {**{n: categories[n] for n in chosen}, "classifier": "classifier"}
        ctx = EvalContext(base, engine, pool, cats, {t: f"reinforce-mlp:{t}" for t in TRAINED}, str(out), args.seed,
                          options={"shots": args.shots, "cem_population": args.cem_population,
                                   "cem_generations": args.cem_generations,
                                   "few_shot_fitness": args.few_shot_fitness})
        cell("expert classifier", "mini-cls", "expert", EvalContext(base, engine, {"classifier": cls_expert},
                                                                     {"classifier": "classifier"},
                                                                     {"mini-cls": "classifier"}, str(out), args.seed))
        for strategy in ("prompt", "cls_expert", "few_shot"):
            for task_name in UNSEEN:
                if not args.unseen or task_name in args.unseen.split(","):
                    cell(strategy, task_name, strategy, ctx)
    return cells


def verdicts(cells: dict) -> dict:
    """The acceptance questions, answered from the cells."""
    from experts.tasks.miniature import TRAINED, UNSEEN

    def acc(row, task):
        c = cells.get(row, {}).get(task)
        return c if c and not c.get("error") else None

    out: dict = {"experts_beyond_base": {}, "unseen_ordering": {}}
    for label in [r[0] for r in RUNS] + [LORA]:
        for t in TRAINED + REAL:
            e, b = acc(f"expert {label}", t), acc("base", t)
            if e and b:
                out["experts_beyond_base"][f"{label} {t}"] = e["ci95"][0] > b["ci95"][1]
    for t in UNSEEN:
        row = [acc(s, t) for s in ("few_shot", "cls_expert", "prompt", "base")]
        if all(row):
            a = [r["accuracy"] for r in row]
            out["unseen_ordering"][t] = {"few_shot>=cls_expert>=prompt>=base": a[0] >= a[1] >= a[2] >= a[3],
                                         "few_shot_beyond_base": row[0]["ci95"][0] > row[3]["ci95"][1],
                                         "accuracies": dict(zip(("few_shot", "cls_expert", "prompt", "base"), a))}
    return out


def markdown(cells: dict, trained: dict) -> str:
    from experts.eval.stats import format_cell
    from experts.tasks.miniature import TRAINED, UNSEEN

    cols = TRAINED + tuple(t for t in REAL if t in cells.get("base", {})) + UNSEEN
    lines = ["| strategy | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in ["base"] + [f"expert {label}" for label, _, _ in RUNS] + [f"expert {LORA}", "prompt", "cls_expert",
                                                                          "few_shot"]:
        if row in cells:
            lines.append(f"| {row} | " + " | ".join(format_cell(cells[row].get(t)) for t in cols) + " |")
    routing = [f"{row} {t} {100 * c['pass1']['accuracy']:.0f}%" for row in ("prompt", "cls_expert")
               for t in UNSEEN if (c := cells.get(row, {}).get(t)) and c.get("pass1")]
    if routing:
        lines += ["", "Pass 1 sends the unseen task to its skill's expert: " + ", ".join(routing) + "."]
    cls = cells.get("expert classifier", {}).get("mini-cls")
    base_cls = cells.get("base", {}).get("mini-cls")
    lines.append("")
    lines.append(f"Classifier expert on the unseen tasks' requests (mini-cls test): {format_cell(cls)}; "
                 f"base model with the same prompt: {format_cell(base_cls)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experts.eval.miniature", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/miniature")
    p.add_argument("--model", default=None, help="Hugging Face folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per expert")
    p.add_argument("--batch", type=int, default=64, help="examples per optimizer step")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rollout", default=None, choices=("greedy", "sample"),
                   help="REINFORCE rollouts for every task (default: sampled at temperature 1, greedy for the "
                        "format task; see ROLLOUTS)")
    p.add_argument("--baseline", default="mean", choices=("none", "mean"), help="REINFORCE reward baseline")
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--val-limit", type=int, default=200)
    p.add_argument("--limit", type=int, default=None, help="test examples per generated task (default: all 500)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="benchmark data root (docs/training.md): ARC-Easy in the text form joins the suite")
    p.add_argument("--real-steps", type=int, default=None, help="optimizer steps on the real benchmark (--steps)")
    p.add_argument("--real-batch", type=int, default=None, help="examples per step there (--batch)")
    p.add_argument("--real-lr", type=float, default=None, help=f"learning rate there (default {REAL_LR})")
    p.add_argument("--real-limit", type=int, default=None, help="its test examples (default: the whole split)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--cem-population", type=int, default=32)
    p.add_argument("--cem-generations", type=int, default=20)
    p.add_argument("--few-shot-fitness", default="task", choices=("task", "loglik"),
                   help="CEM fitness: the task's scorer on greedy replies to the shots, or the answers' likelihood")
    p.add_argument("--ship", default=None, metavar="DIR",
                   help="copy the reinforce-mlp experts into DIR (experts/builtin: the server installs them) with the "
                        "base model's fingerprint")
    p.add_argument("--redo", default="", help="rows to score again although kept, comma-separated (e.g. few_shot)")
    p.add_argument("--unseen", default="", help="pass 1 (prompt, classifier expert, few-shot) on these unseen tasks "
                                                "only, comma-separated (default: all)")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="test generator (0: the fixed test sets) and CEM seed")
    p.add_argument("--quick", action="store_true", help="2 steps of 8, 40 test examples, a small CEM: a smoke run")
    p.add_argument("--fresh", action="store_true",
                   help="retrain and rescore everything (default: keep finished runs and scored cells)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.micro_batch, args.val_every, args.val_limit = 2, 8, 8, 1, 16
        args.limit, args.cem_population, args.cem_generations, args.shots = args.limit or 40, 4, 2, 4
        args.real_limit = args.real_limit or 40
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    for kept in ("runs", "cells"):
        if args.fresh and (out / kept).exists():
            shutil.rmtree(out / kept)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trained = train(args, out, t0)
    if args.ship:
        from engine.loader import resolve_model_folder
        from engine.spec import default_cache_dir
        from experts.store.shipped import ship
        from experts.tasks.miniature import TRAINED

        folder, _ = resolve_model_folder(args.model, Path(args.cache_dir) if args.cache_dir else default_cache_dir())
        shipped = ship({t: Path(trained["reinforce-mlp"][t]["expert_file"]) for t in TRAINED + real_tasks(args)},
                       folder, Path(args.ship))
        _progress(f"shipped {', '.join(str(p) for p in shipped)}", t0)
    cells = evaluate_all(args, out, trained, t0)
    import torch

    from experts.train.memory import peak_gpu_mb, peak_rss_mb

    result = {"settings": vars(args), "training": trained, "cells": cells, "verdicts": verdicts(cells),
              "seconds": round(time.perf_counter() - t0, 1),
              "memory": {"peak_rss_mb": peak_rss_mb(),
                         "peak_gpu_mb": peak_gpu_mb(torch.device("cuda")) if torch.cuda.is_available() else None}}
    (out / "miniature.json").write_text(json.dumps(result, indent=1))
    (out / "curves").mkdir(exist_ok=True)
    for curve in (out / "runs").glob("*/*/*.png"):
        shutil.copy(curve, out / "curves" / f"{curve.parent.parent.name}.{curve.parent.name}.png")
    text = markdown(cells, trained)
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(json.dumps(result["verdicts"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
