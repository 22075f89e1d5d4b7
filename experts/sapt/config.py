"""Settings of a SAPT continual-learning run (REFERENCE.md §2), with defaults sized for SmolLM2-135M and
the generated tasks of ``experts/tasks/synthetic.py`` on one GPU. The reference's LoRA shape (q_proj and
v_proj, r = 8, alpha 32), query projection (h = 100) and key init (uniform in [-1, 1]) are kept; the
learning rates are higher than the reference's 5e-5 for LLaMA because each task gets only ~100 steps here.

Two training details are ours (both measured on the generated tasks, see ``learner.py``): the query
projection's first layer is kept orthogonal to the pooled bare chat template, and ARM's weight ramps
in over the first ``arm_warmup`` of each task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from experts.train.config import RunConfig

METHODS = ("sapt", "sapt_noarm", "seqlora", "single")
ROUTED = ("sapt", "sapt_noarm")  # methods whose blocks are mixed by the shared attention
# Fields a resumed run must share with the run it continues (the others may change: paths, budgets).
RECIPE_FIELDS = ("method", "rank", "lora_alpha", "lora_targets", "hidden", "lr", "router_lr", "key_init", "batch_size", "steps",
                 "kl_ratio", "arm_warmup", "arm_batch", "pseudo_fraction", "min_pseudo", "generator_steps", "generator_lr",
                 "train_limit", "seed")


@dataclass
class SAPTConfig(RunConfig):
    """A SAPT run; the fields every run has (model, store, lr of the LoRA blocks, seed, device, ...) come from
    ``RunConfig``."""

    recipe_fields: ClassVar[tuple[str, ...]] = RECIPE_FIELDS
    tasks: str  # task names in learning order, comma-separated (e.g. "reverse,upper,sort,count")
    run_dir: str = ""  # checkpoint per task, log.jsonl, curves.png, bundle.safetensors, matrix.json
    data: str | None = None  # data root for tasks that read files (generated tasks ignore it)
    name: str = "sapt"  # bundle name in the store
    method: str = "sapt"  # sapt (with ARM) | sapt_noarm | seqlora | single (see METHODS)
    rank: int = 8  # LoRA rank per task block
    lora_alpha: float = 32.0  # LoRA scaling alpha / r
    lora_targets: str = "q_proj,v_proj"  # matrices that get a LoRA block (module names or suffixes)
    hidden: int = 100  # h of the query projection
    router_lr: float = 1e-3  # Adam, the new key and the shared query projection
    batch_size: int = 32  # examples per optimizer step
    micro_batch: int = 32  # rows per forward/backward (memory only)
    steps: int = 100  # optimizer steps per task
    key_init: float = 1.0  # new keys uniform in [-key_init, key_init] (reference: 1); 0: the bundle's N(0, 1/d)
    kl_ratio: float = 1.0  # ARM: weight of KL(stored attention ‖ attention on pseudo-inputs)
    arm_warmup: float = 0.5  # ARM's weight ramps from 0 to kl_ratio over this fraction of a task's steps
    arm_batch: int = 32  # pseudo-inputs per step in the ARM term
    pseudo_fraction: float = 0.02  # pseudo-inputs kept per task, as a fraction of its training examples
    min_pseudo: int = 32  # ... but at least this many
    generator_steps: int = 60  # next-token steps of each task's pseudo-input generator
    generator_lr: float = 2e-3
    val_limit: int | None = 100  # validation examples (the mean attention vector of ARM)
    test_limit: int | None = 100  # test examples per task for a_{i,j}
    eval_every_task: int = 1  # 1: a_{i,j} for all j after every task (the matrix); 0: no evaluation

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if not self.task_list:
            raise ValueError("--tasks names no task")
        if len(set(self.task_list)) != len(self.task_list):
            raise ValueError("--tasks names a task twice")
        if min(self.batch_size, self.micro_batch, self.rank, self.hidden, self.arm_batch) < 1 or self.steps < 0:
            raise ValueError("batch_size, micro_batch, rank, hidden and arm_batch must be >= 1, steps >= 0")

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    @property
    def routed(self) -> bool:
        return self.method in ROUTED

    @property
    def arm(self) -> bool:
        return self.method == "sapt" and self.kl_ratio > 0

    @property
    def target_patterns(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]
