"""Experts shipped with the package (``experts/builtin/*.safetensors``): SVF experts trained for the
embedded SmolLM2-135M-Instruct (GSM8K, MBPP, ARC-Easy, the miniature's skills and the pass-1 classifier).

At start the server puts each of them into its expert store when the served model is the one they were
trained for (the fingerprint in the file's header equals the served weights' fingerprint), so pass 1
has experts to route to without any upload. An expert is installed once per store: a marker file
remembers what was installed, so an expert the user deleted or replaced stays deleted or replaced.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from adapters.atomic import atomic_write
from experts.store.errors import ExpertError
from experts.store.validation import ExpertDraft

log = logging.getLogger("t2serve.experts")

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin"
MARKER = ".shipped.json"


def shipped_files(directory: Path = BUILTIN_DIR) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def draft_from_file(path: Path) -> ExpertDraft:
    from experts.store.expert_file import read_expert_file

    expert, meta = read_expert_file(path)
    desc = (f"shipped SVF expert for {meta.get('task', expert.name)} ({meta.get('objective', '?')}, "
            f"validation accuracy {meta.get('val_acc', '?')})")
    return ExpertDraft(name=expert.name, kind="svf", tensors=expert.z, category=meta.get("category"),
                       description=desc, parametrization=expert.parametrization, targets=tuple(expert.z),
                       base_fingerprint=meta.get("base_fingerprint"), source="shipped")


def install_shipped(store, directory: Path = BUILTIN_DIR) -> list[str]:
    """Put the shipped experts made for the store's base model into ``store``; returns the names added.

    Skipped: experts for another base model (fingerprint), names already in the store, and names
    installed before (listed in the store's marker file).
    """
    marker = Path(store.root) / MARKER
    done = set(json.loads(marker.read_text())) if marker.exists() else set()
    base_fp = store.base.fingerprint if store.base is not None else None
    added = []
    for path in shipped_files(directory):
        draft = draft_from_file(path)
        if draft.name in done or draft.base_fingerprint is None or draft.base_fingerprint != base_fp:
            continue
        if store.get(draft.name) is None:
            try:
                store.put(draft)
            except ExpertError as e:  # e.g. the server adapts other matrices than the expert covers
                log.warning("shipped expert %s not installed: %s", draft.name, e)
                continue
            added.append(draft.name)
        done.add(draft.name)
    if added or (done and not marker.exists()):
        atomic_write(marker, json.dumps(sorted(done)).encode())
    if added:
        log.info("shipped experts installed: %s", ", ".join(added))
    return added


def ship(sources: dict[str, Path], model_folder: str | Path, directory: Path = BUILTIN_DIR) -> list[Path]:
    """Copy trained expert files into ``directory`` as ``<name>.safetensors``, their header carrying the
    fingerprint of the weights in ``model_folder`` (what ``install_shipped`` checks against the served model)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    from experts.store.base_model import model_fingerprint

    net = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    fingerprint = model_fingerprint(net)
    del net
    written = []
    for name, src in sources.items():
        with safe_open(str(src), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        meta.update(name=name, base_fingerprint=fingerprint)
        dst = Path(directory) / f"{name}.safetensors"
        atomic_write(dst, save(tensors, metadata=meta))
        dst.chmod(0o644)  # package data: readable by the server's own user (the image runs as uid 10001)
        written.append(dst)
    return written
