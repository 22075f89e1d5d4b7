"""The file of one trained SVF expert, and where it goes: ``<run_dir>/expert.safetensors`` always (z per
target, named by module, with metadata in the header), and the expert store when ``--store`` is given, as a new version of the
expert's name in the store's own format (tensors + JSON record, validated against the base model).

``read_expert_file`` loads the run-directory file back (evaluation of a run without a store).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from adapters import SVFExpert
from adapters.atomic import atomic_write

log = logging.getLogger("t2serve.train")
EXPERT_FILE = "expert.safetensors"


def write_expert_file(path: Path, name: str, z: Mapping[str, torch.Tensor], parametrization: str,
                      meta: Mapping[str, str]) -> None:
    tensors = {n: v.detach().to("cpu", torch.float32).contiguous() for n, v in z.items()}
    header = {"kind": "svf", "name": name, "parametrization": parametrization, **{k: str(v) for k, v in meta.items()}}
    atomic_write(path, st_save(tensors, metadata=header))


def read_expert_file(path: str | Path) -> tuple[SVFExpert, dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("kind", "svf") != "svf":
            raise ValueError(f"{path}: kind {meta.get('kind')!r} is not an SVF expert")
        z = {n: f.get_tensor(n).to(torch.float32) for n in f.keys()}
    return SVFExpert(meta.get("name") or Path(path).stem, z, meta.get("parametrization", "sakana")), meta


def put_draft(store_dir: Path, base, draft) -> str:
    """Store an ``ExpertDraft`` as the next version of its name, validated against the loaded base model;
    returns where it went."""
    from experts.store.base_model import BaseModelInfo
    from experts.store.expert_store import ExpertStore

    info = BaseModelInfo.from_model(base.model, base.name, targets=base.runtime.targets)
    store = ExpertStore(store_dir, base=info)
    store.load(recover=False)  # next version number; never sweeps files a running server may be writing
    stored = store.put(draft)
    return f"{store_dir}/{draft.name} v{stored.record.version}"


def put_in_store(store_dir: Path, base, name: str, z: Mapping[str, torch.Tensor], parametrization: str,
                 category: str, description: str) -> str:
    """Store ``z`` as the next version of ``name``; returns where it went."""
    from experts.store.validation import ExpertDraft

    tensors = {n: v.detach().to("cpu", torch.float32) for n, v in z.items()}
    return put_draft(store_dir, base, ExpertDraft(name=name, kind="svf", tensors=tensors, category=category,
                                                  description=description[:1000], parametrization=parametrization,
                                                  targets=tuple(tensors), source="training"))
