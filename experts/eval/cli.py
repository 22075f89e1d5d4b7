"""Command line of evaluation: ``t2serve eval`` and ``python -m experts.eval``.

    eval --task gsm8k --strategy base --data DIR            one cell: accuracy with its 95% interval
    eval --task gsm8k --strategy expert --expert runs/gsm8k/expert.safetensors --data DIR
    eval --table --store DIR --data DIR                     the whole table of issue 6
Experts come from an expert store (``--store``) and/or ``--expert [TASK=]NAME|FILE`` (a store name or an
``expert.safetensors`` of a training run). Results go to ``--out`` as JSON (with one record per example)
and Markdown, and the Markdown is printed. Imports nothing from the server's settings.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from experts.tasks.base import DataMissingError, data_root
from experts.train.flags import COMMON_HELP, LOG_LEVEL_HELP

log = logging.getLogger("t2serve.eval")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="gsm8k | mbpp | arc-easy | arc-challenge | math500 | humaneval | cls")
    p.add_argument("--strategy", default="base", help="base | expert | prompt | cls_expert | few_shot")
    p.add_argument("--table", action="store_true", help="evaluate the whole table (all tasks and strategies)")
    p.add_argument("--rows", default=None, help="with --table: only these strategies (comma-separated); cells "
                   "already in OUT/table.json are kept, so a table can be filled by several commands")
    p.add_argument("--data", default=None, help="benchmark data root (gsm8k/, mbpp/, arc/ ...; docs/training.md; "
                   "default: $T2_DATA_DIR; generated tasks need none)")
    p.add_argument("--model", default=None, help="Hugging Face folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--store", default=None, help="expert store folder to load experts from")
    p.add_argument("--expert", action="append", default=[], metavar="[TASK=]NAME|FILE",
                   help="an expert for strategy 'expert' (repeatable; TASK= says which task it was trained on)")
    p.add_argument("--split", default="test", help="which examples to score: train | val | test (default: test)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--max-tokens", type=int, default=None, help="reply length (default: the task's)")
    p.add_argument("--out", default="eval-results", help="folder for the JSON and Markdown results")
    p.add_argument("--targets", default="mlp", help="adapted matrices (must match the experts): mlp | attn | all")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine slots (default 256 on GPU, 16 on CPU)")
    p.add_argument("--max-model-len", type=int, default=1024, help="prompt + reply tokens (default: 1024)")
    p.add_argument("--device", default="auto", help=COMMON_HELP["device"] + " (default: auto)")
    p.add_argument("--dtype", default="auto", help=COMMON_HELP["dtype"] + " (default: auto)")
    p.add_argument("--threads", type=int, default=None, help=COMMON_HELP["threads"])
    p.add_argument("--cache-dir", default=None, help=COMMON_HELP["cache_dir"])
    p.add_argument("--seed", type=int, default=0, help="CEM's seed, and the test generator's for generated tasks "
                   "(mini-*): 0 is their fixed test set, any other value fresh draws")
    p.add_argument("--shots", type=int, default=10, help="few_shot: examples the CEM search sees")
    p.add_argument("--cem-population", type=int, default=32, help="few_shot: CEM population (reference 32)")
    p.add_argument("--cem-generations", type=int, default=50, help="few_shot: CEM generations (reference 50)")
    p.add_argument("--log-level", default="info", help=LOG_LEVEL_HELP + " (default: info)")


def add_subcommand(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a strategy on a task (95%% interval), or the whole table")
    add_eval_flags(p)
    p.set_defaults(func=run_eval)


def load_experts(base, store: str | None, specs: list[str]):
    """(experts by name, category by name, expert name by task) from a store and ``--expert`` specs."""
    from experts.store.expert_file import read_expert_file

    experts, categories, task_experts = {}, {}, {}
    if store:
        from experts.store.base_model import BaseModelInfo
        from experts.store.expert_store import ExpertStore

        st = ExpertStore(store, base=BaseModelInfo.from_model(base.model, base.name, targets=base.runtime.targets))
        for s in st.load(recover=False):
            if s.ready and s.record.kind in ("svf", "mixture"):
                experts[s.name], categories[s.name] = s.payload, s.record.category or "other"
    for spec in specs:
        task, _, ref = spec.rpartition("=")
        if ref.endswith(".safetensors") and Path(ref).is_file():
            expert, meta = read_expert_file(ref)
            experts[expert.name], categories[expert.name] = expert, meta.get("category", "other")
            task = task or meta.get("task", "")
            ref = expert.name
        elif ref not in experts:
            raise SystemExit(f"--expert {spec}: {ref!r} is neither an expert file nor an expert of --store")
        if task:
            task_experts[task] = ref
    for name in experts:  # by convention an expert named after a task was trained on it
        task_experts.setdefault(name, name)
    return experts, categories, task_experts


def run_eval(args: argparse.Namespace) -> int:
    from experts.eval.evaluate import evaluate
    from experts.eval.stats import format_cell
    from experts.eval.strategies import EvalContext
    from experts.eval.table import ROWS, markdown, run_table
    from experts.tasks import get_task
    from experts.train.model import load_base
    from experts.train.rollout import make_engine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.table and not args.task:
        raise SystemExit("eval needs --task (with --strategy) or --table")
    args.data = data_root(args.data)  # before the model loads: a wrong path is one line, at once
    base = load_base(args.model, device=args.device, dtype=args.dtype, targets=args.targets,
                     cache_dir=args.cache_dir, threads=args.threads)
    experts, categories, task_experts = load_experts(base, args.store, args.expert)
    slots = args.max_num_seqs or (256 if base.device.type == "cuda" else 16)
    ctx = EvalContext(base, make_engine(base, slots, args.max_model_len), experts, categories, task_experts,
                      args.data, args.seed, options={"shots": args.shots, "cem_population": args.cem_population,
                                                     "cem_generations": args.cem_generations})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write_samples(res: dict) -> None:
        path = out / f"{res['task']}-{res['strategy']}.samples.jsonl"
        path.write_text("".join(json.dumps(s) + "\n" for s in res["samples"]))

    if args.table:
        rows = [r for r in ROWS if args.rows is None or r[0] in args.rows.split(",")]
        done = json.loads((out / "table.json").read_text())["cells"] if (out / "table.json").exists() else None

        def save(table: dict) -> str:
            table.update(model=base.name, limit=args.limit, max_tokens=args.max_tokens, experts=sorted(experts))
            text = markdown(table)
            (out / "table.json").write_text(json.dumps(table, indent=1))
            (out / "table.md").write_text(text + "\n")
            return text

        text = save(run_table(ctx, limit=args.limit, max_tokens=args.max_tokens, rows=rows, on_cell=write_samples,
                              done=done, on_table=save))
    else:
        task = get_task(args.task).seeded(args.seed)
        res = evaluate(ctx, task, args.strategy, split=args.split, limit=args.limit, max_tokens=args.max_tokens)
        write_samples(res)
        summary = {k: v for k, v in res.items() if k != "samples"}
        stem = f"{task.name}-{args.strategy}"
        (out / f"{stem}.json").write_text(json.dumps({**summary, "model": base.name}, indent=1))
        text = (f"| task | strategy | accuracy [95% CI] |\n|---|---|---|\n"
                f"| {task.name} | {args.strategy} | {format_cell(summary)} |")
        if "pass1" in summary:
            text += f"\n\npass-1 classification: {format_cell(summary['pass1'])} {summary['pass1']['chosen']}"
        (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experts.eval", description="Evaluate strategies on held-out data")
    add_eval_flags(p)
    args = p.parse_args(argv)
    try:
        return run_eval(args)
    except DataMissingError as e:  # one line saying which file is expected where, no traceback
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
