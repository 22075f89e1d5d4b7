"""Command line of SVF training: the ``svf`` and ``classifier`` kinds of ``t2serve train`` and ``python -m
experts.train`` (the command itself: ``experts.commands``; ``sapt``: ``experts/sapt/cli.py``).

Flags are generated from ``TrainConfig`` (one flag per field, ``--batch-size`` for ``batch_size``), so
the two entry points and the config can never disagree. Imports nothing from the server's settings.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from experts.train.config import OBJECTIVES, ROLLOUTS, TrainConfig
from experts.train.flags import LOG_LEVEL_HELP, add_config_flags

HELP = {
    "task": "gsm8k | mbpp | arc-easy | arc-challenge | arc-easy-text | cls (see experts/tasks)",
    "data": "benchmark data root (gsm8k/, mbpp/, arc/ ...; docs/training.md) or the task's own folder "
            "(default: $T2_DATA_DIR; generated tasks need none)",
    "run_dir": "folder for checkpoint, log.jsonl, curves.png and expert.safetensors (default runs/<name>)",
    "model": "Hugging Face folder or .gguf file (default: the embedded SmolLM2)",
    "store": "expert store folder to put the trained expert in (e.g. ~/.cache/t2serve/experts)",
    "store_when": "always | improved (put the expert in --store only if a trained step beat step 0, "
                  "i.e. the base, on validation)",
    "name": "expert name (default: the task name; 'classifier' for cls)",
    "targets": "adapted matrices: mlp | attn | all",
    "parametrization": "sakana (sigmoid + rescale, reference code) | direct (paper formula)",
    "objective": " | ".join(OBJECTIVES),
    "baseline": "reinforce reward baseline: none (reference, r = ±1) | mean (r minus the batch mean)",
    "kl_coef": "λ of the KL(π_ref‖π) term (reference: 0, 0.1, 0.2, 0.3)",
    "rollout": " | ".join(ROLLOUTS),
    "micro_batch": "rows per forward/backward (memory only)",
    "max_num_seqs": "engine slots for rollouts (default min(batch size, 256))",
    "max_model_len": "prompt + reply tokens; longer prompts are skipped",
    "val_limit": "use the first N validation examples",
    "lr": "Adam learning rate",
    "clip": "largest global gradient norm",
    "batch_size": "examples per optimizer step (the last of an epoch may be smaller)",
    "epochs": "passes over the training examples",
    "max_steps": "stop after this many optimizer steps in total (default: the epochs' steps)",
    "val_every": "validate every N steps (and after the last step)",
    "temperature": "sampled rollouts: sampling temperature",
    "top_p": "sampled rollouts: nucleus sampling's top-p",
    "max_tokens": "new tokens per reply (default: the task's)",
    "train_limit": "use the first N training examples",
}


def add_train_flags(p: argparse.ArgumentParser, *, with_task: bool = True) -> None:
    add_config_flags(p, TrainConfig, HELP, skip=() if with_task else ("task",), optional=("run_dir", "data"))
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    p.add_argument("--log-level", default="info", help=LOG_LEVEL_HELP + " (default: info)")


def add_kinds(kinds) -> None:
    """Register ``svf`` and ``classifier`` on the ``train`` command's subparsers (``experts.commands``)."""
    svf = kinds.add_parser("svf", help="train an SVF expert on a task")
    add_train_flags(svf)
    svf.set_defaults(func=run_train)
    cls = kinds.add_parser("classifier", help="train the pass-1 classifier expert (= train svf --task cls)")
    add_train_flags(cls, with_task=False)
    cls.set_defaults(func=run_train, task="cls")


def run_train(args: argparse.Namespace) -> int:
    from experts.tasks.base import data_root
    from experts.train.model import load_base
    from experts.train.trainer import SVFTrainer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    cfg = TrainConfig(**{**values, "run_dir": values["run_dir"] or "", "data": data_root(values["data"])})
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{cfg.expert_name}"
    base = load_base(cfg.model, device=cfg.device, dtype=cfg.dtype, targets=cfg.targets, cache_dir=cfg.cache_dir,
                     threads=cfg.threads)
    summary = SVFTrainer(cfg, base, resume=args.resume).run()
    print(f"expert {summary['expert']}: best validation accuracy {summary['best_val']} at step "
          f"{summary['best_step']} of {summary['steps']}; {summary['expert_file']}"
          + (f"; stored as {summary['stored']}" if summary["stored"] else ""))
    return 0
