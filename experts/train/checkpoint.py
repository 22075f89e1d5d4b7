"""Resumable training state: z, Adam's moments, the best z so far, and the step counter.

Everything else a run needs is derived from (config, step): the data order of each epoch comes from
``seed + epoch``, sampled rollouts take per-request seeds from ``(seed, step, row)``. So resuming from
step s repeats, float for float, what the uninterrupted run did after step s.

Files in the run directory: ``ckpt-<step>.safetensors`` (the tensors) and ``checkpoint.json`` (step,
scalars, the tensor file's name and sha256). The JSON is written last and atomically: it is the
commit point, so a crash at any moment leaves the previous checkpoint usable. Older tensor files are
removed after the commit.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.atomic import atomic_write

FORMAT = "t2serve-train-checkpoint/1"
INDEX = "checkpoint.json"


@dataclass
class TrainState:
    step: int  # optimizer steps done
    z: dict[str, torch.Tensor]  # target name -> (k,) float32, current parameters
    exp_avg: dict[str, torch.Tensor]  # Adam first moment per target (empty before the first step)
    exp_avg_sq: dict[str, torch.Tensor]  # Adam second moment per target
    adam_step: float  # Adam's own step count (bias correction)
    best_z: dict[str, torch.Tensor]  # z with the best validation accuracy so far
    best_val: float | None  # that accuracy (None: never validated)
    best_step: int  # the step it was reached at
    config: dict  # TrainConfig as a dict


def save(run_dir: Path, state: TrainState) -> None:
    tensors = {}
    for prefix, group in (("z", state.z), ("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq),
                          ("best", state.best_z)):
        for name, t in group.items():
            tensors[f"{prefix}/{name}"] = t.detach().to("cpu", torch.float32).contiguous()
    write_committed(run_dir, INDEX, FORMAT, f"ckpt-{state.step:06d}.safetensors", st_save(tensors),
                    {"step": state.step, "adam_step": state.adam_step, "best_val": state.best_val,
                     "best_step": state.best_step, "config": state.config})


def write_committed(run_dir: Path, index_name: str, fmt: str, fname: str, data: bytes, fields: dict) -> None:
    """Commit a checkpoint: the tensor file ``fname`` first, then the JSON index naming it with its sha256
    (the commit point; both atomic), then older tensor files of the same kind are removed."""
    atomic_write(run_dir / fname, data)
    index = {"format": fmt, "file": fname, "sha256": hashlib.sha256(data).hexdigest(), **fields}
    atomic_write(run_dir / index_name, json.dumps(index, indent=1).encode())
    stem = fname.split("-", 1)[0]
    for p in run_dir.glob(f"{stem}-*.safetensors"):
        if p.name != fname:
            p.unlink(missing_ok=True)


def read_committed(run_dir: Path, index_name: str, fmt: str) -> tuple[dict, bytes] | None:
    """(index, tensor file bytes) of a committed checkpoint: the JSON index names the tensor file and its
    sha256, which is checked. None if there is no index."""
    index_path = run_dir / index_name
    if not index_path.exists():
        return None
    index = json.loads(index_path.read_text())
    if index.get("format") != fmt:
        raise ValueError(f"{index_path} is not a {fmt} index")
    data = (run_dir / index["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise ValueError(f"{index['file']} does not match the sha256 in {index_name}")
    return index, data


def load(run_dir: Path) -> TrainState | None:
    """The committed checkpoint of ``run_dir``, or None if there is none."""
    found = read_committed(run_dir, INDEX, FORMAT)
    if found is None:
        return None
    index, data = found
    groups: dict[str, dict[str, torch.Tensor]] = {"z": {}, "exp_avg": {}, "exp_avg_sq": {}, "best": {}}
    for key, t in st_load(data).items():
        prefix, _, name = key.partition("/")
        groups[prefix][name] = t
    return TrainState(index["step"], groups["z"], groups["exp_avg"], groups["exp_avg_sq"], index["adam_step"],
                      groups["best"], index["best_val"], index["best_step"], index["config"])
