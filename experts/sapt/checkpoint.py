"""Task-boundary checkpoints of a SAPT run: after each learned task, the bundle's tensors (the store's
layout, ``experts/store/sapt_tensors.py``) and the learner's state (tasks learned, ARM's mean attention vectors
and pseudo-inputs, the score rows). A run resumed from it continues with the next task; a run given a
longer task list continues the sequence (continual learning over several commands).

Files: ``bundle-<k>.safetensors`` and ``checkpoint.json`` (written last and atomically: the commit
point, with the tensor file's sha256), as the SVF trainer's checkpoints do.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from experts.train.checkpoint import read_committed, write_committed

FORMAT = "t2serve-sapt-checkpoint/1"
INDEX = "checkpoint.json"


def save(run_dir: Path, snapshot: dict, config: dict) -> None:
    state = {k: v for k, v in snapshot.items() if k != "tensors"}
    write_committed(run_dir, INDEX, FORMAT, f"bundle-{len(snapshot['learned']):03d}.safetensors",
                    st_save(snapshot["tensors"]), {"config": config, "state": state})


def load(run_dir: Path) -> tuple[dict, dict] | None:
    """(snapshot for ``SequenceLearner.restore``, config dict) of the committed checkpoint, or None."""
    found = read_committed(run_dir, INDEX, FORMAT)
    if found is None:
        return None
    index, data = found
    return {**index["state"], "tensors": st_load(data)}, index["config"]
