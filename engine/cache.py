"""What the cache folder holds, and pruning it (``t2serve cache``; the ``cache_max_gb`` setting).

Entries, each one file or folder under the cache folder, with its size and when it was last used (its
modification time: the loader and the SVD cache touch an entry when they use it):

- ``model``     models/<name>-<key>/: a GGUF file converted to a Hugging Face folder
- ``svd``       svd/<key>.safetensors: the SVD factors of one model's adapted matrices
- ``vllm``      vllm/run-<pid>-...: the scratch folder of a vLLM engine (kept while its process lives)
- ``training``  training/<job>/: a training run started through the HTTP API (its logs and checkpoints)

The expert store (``experts/`` by default) is listed but never pruned: it holds users' experts. An entry in
use (the model and SVD factors a running server loaded, a live vLLM scratch folder) is passed in ``keep``
and never removed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("model", "svd", "vllm", "training")
_FOLDERS = {"models": "model", "svd": "svd", "vllm": "vllm", "training": "training"}


@dataclass(frozen=True)
class Entry:
    kind: str  # one of KINDS, or "experts" (never pruned)
    path: Path
    size: int  # bytes
    used: float  # last use, seconds since the epoch
    about: str = ""

    @property
    def prunable(self) -> bool:
        return self.kind in KINDS


def touch(path: Path) -> None:
    """Mark ``path`` as used now (best effort: a read-only cache stays as it is)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _about(kind: str, path: Path) -> str:
    if kind == "svd":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                targets = json.loads((f.metadata() or {}).get("targets", "[]"))
            return f"{len(targets)} matrices" + (f", {targets[0]} ..." if targets else "")
        except Exception:
            return "unreadable (rebuilt on next use)"
    if kind == "model":
        config = path / "config.json"
        if config.exists():
            arch = json.loads(config.read_text()).get("architectures") or ["?"]
            return arch[0]
    if kind == "vllm":
        return "live engine" if scratch_alive(path) else "left by a stopped engine"
    return ""


def scratch_alive(scratch: Path) -> bool:
    """Whether the process a vLLM scratch folder (``run-<pid>-...``) belongs to is running."""
    try:
        pid = int(scratch.name.split("-")[1])
        os.kill(pid, 0)
        return True
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def entries(root: Path, expert_dir: Path | None = None) -> list[Entry]:
    """Every entry under ``root``, least recently used first (the expert store last)."""
    out: list[Entry] = []
    for folder, kind in _FOLDERS.items():
        base = root / folder
        if not base.is_dir():
            continue
        for p in base.iterdir():
            if p.name.startswith(".") or (kind == "svd" and p.suffix != ".safetensors"):
                continue  # lock files, temporary files of a write in progress
            out.append(Entry(kind, p, _size(p), p.stat().st_mtime, _about(kind, p)))
    out.sort(key=lambda e: e.used)
    store = expert_dir if expert_dir is not None else root / "experts"
    if store.is_dir():
        out.append(Entry("experts", store, _size(store), store.stat().st_mtime, "the expert store (never pruned)"))
    return out


def prune(root: Path, *, kinds: tuple[str, ...] = KINDS, older_than_s: float | None = None,
          max_bytes: int | None = None, keep: tuple[Path, ...] = (), expert_dir: Path | None = None,
          dry_run: bool = False) -> list[Entry]:
    """Remove entries of ``kinds``: those unused for ``older_than_s``, then the least recently used until
    the prunable entries fit in ``max_bytes`` (neither given: all of them). Live vLLM scratch folders and
    ``keep`` are never removed. Returns what was (or, dry, would be) removed."""
    keep_set = {Path(k).resolve() for k in keep}
    listed = [e for e in entries(root, expert_dir) if e.prunable]
    candidates = [e for e in listed if e.kind in kinds and e.path.resolve() not in keep_set
                  and not (e.kind == "vllm" and scratch_alive(e.path))]
    now = time.time()
    chosen: list[Entry] = []
    if older_than_s is None and max_bytes is None:
        chosen = candidates
    else:
        if older_than_s is not None:
            chosen = [e for e in candidates if now - e.used > older_than_s]
        if max_bytes is not None:
            total = sum(e.size for e in listed) - sum(e.size for e in chosen)
            for e in candidates:  # least recently used first
                if total <= max_bytes:
                    break
                if e not in chosen:
                    chosen.append(e)
                    total -= e.size
    if not dry_run:
        for e in chosen:
            if e.path.is_dir():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
    return chosen


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
