"""Settings of one SVF training run, with the reference recipe as defaults (REFERENCE.md §1):
REINFORCE, KL coefficient 0, Adam lr 2e-3, gradient-norm clip 1e-3, batch 256, greedy rollouts,
MLP targets, the ``sakana`` parametrization, best checkpoint by validation accuracy.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

OBJECTIVES = ("reinforce", "next_token")
BASELINES = ("none", "mean")
ROLLOUTS = ("greedy", "sample")
# Fields a resumed run must share with the run it continues (the others may change: paths, budgets).
RECIPE_FIELDS = ("task", "targets", "parametrization", "objective", "baseline", "kl_coef", "lr", "clip", "batch_size",
                 "rollout", "temperature", "top_p", "max_tokens", "train_limit", "val_limit", "seed")


@dataclass(kw_only=True)
class RunConfig:
    """What every training run (SVF and SAPT) has: the model it adapts, where it runs and writes, the
    optimizer's basics; the JSON round trip and the resume check. Kinds add their own fields."""

    recipe_fields: ClassVar[tuple[str, ...]] = ()  # fields a resumed run must share with the run it continues

    model: str | None = None  # HF folder or .gguf; None = the embedded SmolLM2
    store: str | None = None  # expert store folder the result is written to (None: only the run dir)
    lr: float = 2e-3  # Adam
    train_limit: int | None = None  # first N training examples (of each task)
    max_num_seqs: int | None = None  # engine slots for rollouts and evaluation (default: per kind)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    cache_dir: str | None = None  # converted models and SVD factors (default: the server's cache)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def recipe_mismatch(self, other) -> list[str]:
        """Names of recipe fields that differ (a run can only be resumed with the same recipe)."""
        return [f for f in self.recipe_fields if getattr(self, f) != getattr(other, f)]


@dataclass
class TrainConfig(RunConfig):
    recipe_fields: ClassVar[tuple[str, ...]] = RECIPE_FIELDS

    task: str
    data: str | None  # data root (docs/training.md) or the task's own folder; None: generated tasks only
    run_dir: str  # checkpoint, JSONL log, learning curves, best z
    store_when: str = "always"  # always | improved: only when a trained step beat the starting point on validation
    name: str | None = None  # expert name (default: the task name; "classifier" for cls)
    targets: str = "mlp"  # mlp | attn | all
    parametrization: str = "sakana"  # sakana | direct
    objective: str = "reinforce"  # reinforce | next_token
    baseline: str = "none"  # reinforce: "mean" uses r - mean(r) of the batch (reference: none, r = ±1)
    kl_coef: float = 0.0  # λ of the KL(π_ref ‖ π) term (reinforce only)
    clip: float = 1e-3  # max global gradient norm
    batch_size: int = 256  # examples per optimizer step (the last batch of an epoch may be smaller)
    micro_batch: int = 8  # rows per forward/backward (memory only; does not change the result)
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps in total
    val_every: int = 1  # validate every N steps (and after the last step)
    val_limit: int | None = None  # first N validation examples
    rollout: str = "greedy"  # greedy | sample
    temperature: float = 1.0  # sampled rollouts
    top_p: float = 1.0
    max_tokens: int | None = None  # new tokens per reply (default: the task's)
    max_model_len: int = 1024  # longer prompts are skipped

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}")
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"rollout must be one of {ROLLOUTS}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}")
        if self.store_when not in ("always", "improved"):
            raise ValueError("store_when must be 'always' or 'improved'")
        if self.batch_size < 1 or self.micro_batch < 1 or self.epochs < 0 or self.val_every < 1:
            raise ValueError("batch_size, micro_batch, val_every must be >= 1 and epochs >= 0")

    @property
    def expert_name(self) -> str:
        return self.name or ("classifier" if self.task in ("cls", "classifier") else self.task)
