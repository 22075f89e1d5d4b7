"""SVF expert files: one safetensors file (a z vector per target matrix, named by the module name)
whose header metadata records kind and parametrization. Written atomically; read without pickle."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.adaptation import SVFExpert

log = logging.getLogger("t2serve.experts")


def save_svf(expert: SVFExpert, path: Path, extra_meta: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: z.detach().to(torch.float32).contiguous().cpu() for n, z in expert.z.items()}
    meta = {"kind": "svf", "name": expert.name, "parametrization": expert.parametrization, **(extra_meta or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_svf(path: Path) -> tuple[SVFExpert, dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("kind", "svf") != "svf":
            raise ValueError(f"{path.name}: kind {meta.get('kind')!r} is not an SVF expert")
        z = {n: f.get_tensor(n).to(torch.float32) for n in f.keys()}
    name = meta.get("name") or path.stem
    return SVFExpert(name, z, meta.get("parametrization", "sakana")), meta


def load_dir(directory: Path) -> list[tuple[SVFExpert, dict[str, str]]]:
    """Every readable expert file in `directory`; unreadable ones are skipped with a warning."""
    out = []
    if not directory.is_dir():
        return out
    for p in sorted(directory.glob("*.safetensors")):
        try:
            out.append(load_svf(p))
        except Exception as e:
            log.warning("skipping expert file %s: %s", p.name, e)
    return out
