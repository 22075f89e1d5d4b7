"""``t2serve train sapt`` / ``python -m experts.train sapt``: flags generated from ``SAPTConfig``.

    train sapt --tasks reverse,upper,sort,count --store DIR          learn the sequence, store the bundle
    train sapt --tasks ... --resume                                   continue a run (or a longer sequence)
    train sapt --tasks ... --compare --seeds 0,1 --out DIR            SAPT vs SAPT w/o ARM vs SeqLoRA (+ FWT)
Imports nothing from the server's settings or HTTP code.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import fields

from experts.sapt.config import METHODS, SAPTConfig
from experts.train.flags import LOG_LEVEL_HELP, add_config_flags

HELP = {
    "tasks": "task names in learning order, comma-separated (generated: reverse, sort, upper, count, sum)",
    "run_dir": "folder for checkpoint, log.jsonl, curves.png, bundle.safetensors, matrix.json (default runs/<name>)",
    "data": "benchmark data root for tasks read from files (docs/training.md; default: $T2_DATA_DIR); "
            "generated tasks need none",
    "model": "Hugging Face folder or .gguf file (default: the embedded SmolLM2)",
    "store": "expert store folder to put the bundle in (served by the 'sapt' strategy)",
    "name": "bundle name in the store",
    "method": " | ".join(METHODS) + " (train: sapt or sapt_noarm make a routed bundle)",
    "lora_targets": "matrices with LoRA blocks (module names/suffixes, comma-separated); a server serving the "
                    "bundle must adapt them (T2_ADAPT_TARGETS=attn or all)",
    "lr": "Adam learning rate of the LoRA blocks",
    "router_lr": "Adam learning rate of the new key and the shared query projection",
    "steps": "optimizer steps per task",
    "kl_ratio": "ARM: weight of KL(stored attention || attention on pseudo-inputs); 0 disables ARM",
    "pseudo_fraction": "ARM: pseudo-inputs kept per task, as a fraction of its training size (reference 0.02)",
    "eval_every_task": "1: score the learned tasks after each task (the a_ij rows); 0: skip",
    "max_num_seqs": "engine slots for evaluation and sampling (default 256 on GPU, 64 on CPU)",
    "train_limit": "use the first N training examples of each task",
    "rank": "LoRA rank per task block",
    "lora_alpha": "LoRA scaling numerator (scaling = alpha / rank)",
    "hidden": "width h of the query projection",
    "batch_size": "examples per optimizer step",
    "micro_batch": "rows per forward/backward (memory only)",
    "key_init": "new keys uniform in [-key_init, key_init] (reference: 1); 0: the bundle's N(0, 1/d)",
    "arm_warmup": "ARM: its weight ramps from 0 to kl_ratio over this fraction of a task's steps",
    "arm_batch": "ARM: pseudo-inputs per step",
    "min_pseudo": "ARM: pseudo-inputs kept per task at least",
    "generator_steps": "next-token steps of each task's pseudo-input generator",
    "generator_lr": "Adam learning rate of the pseudo-input generator",
    "val_limit": "validation examples per task (ARM's mean attention vector)",
    "test_limit": "test examples per task for the accuracy matrix a_ij",
}


def add_sapt_parser(kinds) -> None:

    p = kinds.add_parser("sapt", help="SAPT continual learning: learn tasks in turn, store the bundle; "
                                      "--compare runs the baselines and prints AP / F.Ra / FWT / BWT")
    add_config_flags(p, SAPTConfig, HELP)
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    p.add_argument("--compare", action="store_true", help="run SAPT, SAPT w/o ARM, SeqLoRA and per-task LoRA "
                                                          "for each of --seeds and print the metrics table")
    p.add_argument("--seeds", default="0,1", help="--compare: seeds, comma-separated")
    p.add_argument("--out", default="sapt-results", help="--compare: folder for the JSON, Markdown and heat map")
    p.add_argument("--log-level", default="info", help=LOG_LEVEL_HELP + " (default: info)")
    p.set_defaults(func=run_sapt)


def run_sapt(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from experts.tasks.base import data_root

    cfg = SAPTConfig(**{f.name: getattr(args, f.name) for f in fields(SAPTConfig)})
    cfg.data = data_root(cfg.data)
    if args.compare:
        from experts.sapt.compare import run_compare

        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        run_compare(cfg, seeds, args.out)
        return 0
    from experts.sapt.run import train_sequence

    summary = train_sequence(cfg, resume=args.resume)
    print(f"bundle {summary['name']} ({summary['method']}, tasks {', '.join(summary['tasks'])}): "
          f"{summary['bundle_file']}" + (f"; stored as {summary['stored']}" if summary["stored"] else ""))
    return 0
