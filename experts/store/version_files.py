"""The expert store's files on disk: where each version lives, and listing, reading and removing them.

Layout under the store folder (``Settings.resolved_expert_dir()``):
    <name>/v000003.safetensors   the tensors of version 3 (re-serialised by the server)
    <name>/v000003.json          its metadata record, written last: the version's commit point
    .incoming/                   fully written tensor files waiting for their commit
    .trash-<name>-<id>/          a deleted expert on its way out
    .quarantine/<name>-<time>/   committed versions found damaged at a start, kept for inspection
A version exists once its JSON record does; it is usable when its tensor file matches the record's size
and sha256. A committed version that is not (bit rot, a hand edit: a crash cannot leave one, the record
is written last and atomically) is user data: moved aside into the quarantine, never deleted. Writing
and deleting (the order of the steps, the lock) are ``expert_store``'s business.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from adapters.atomic import TMP_SUFFIX
from experts.store.errors import ExpertError
from experts.store.records import ExpertRecord
from experts.store.tensor_files import read_safetensors

log = logging.getLogger("t2serve.experts")

VERSION_RE = re.compile(r"v(\d{6,})\.(json|safetensors)")
INCOMING = ".incoming"
TRASH_PREFIX = ".trash-"
QUARANTINE = ".quarantine"
QUARANTINE_NOTE = "quarantine.json"  # in each quarantined folder: what it holds and why


def version_file(directory: Path, version: int, ext: str) -> Path:
    return directory / f"v{version:06d}.{ext}"


def trash_path(root: Path, name: str) -> Path:
    """A fresh trash name for the folder of ``name`` (removed by the next ``sweep`` if not before)."""
    return root / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"


def list_versions(directory: Path, remove_temps: bool) -> dict[int, set[str]]:
    """Version number -> the extensions present ({"json", "safetensors"} for a complete one).
    ``remove_temps``: also remove temporary files of atomic writes that never finished (only safe while
    no writer can be running: the caller recovers and holds the store lock)."""
    versions: dict[int, set[str]] = {}
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:  # deleted meanwhile, or not created yet
        return versions
    for p in entries:
        m = VERSION_RE.fullmatch(p.name)
        if m:
            versions.setdefault(int(m.group(1)), set()).add(m.group(2))
        elif p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and remove_temps:
            p.unlink(missing_ok=True)  # an atomic write that never finished
    return versions


def name_dirs(root: Path) -> list[Path]:
    """The folders that may hold an expert (the caller checks the name)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_version(directory: Path, v: int) -> tuple[ExpertRecord, dict]:
    """Version ``v``'s record and tensors; ExpertError (or OSError) unless they match each other."""
    record = ExpertRecord.from_json(version_file(directory, v, "json").read_bytes())
    data = version_file(directory, v, "safetensors").read_bytes()
    if record.name != directory.name or record.version != v:
        raise ExpertError(f"record names {record.name} v{record.version}")
    if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.sha256:
        raise ExpertError("tensor file does not match the record's size and sha256")
    return record, read_safetensors(data, "the stored tensor file")


def newest_readable(directory: Path, versions: dict[int, set[str]]
                    ) -> tuple[tuple[int, ExpertRecord, dict] | None, dict[int, str]]:
    """The newest committed version that reads back intact (older ones tried in turn), or None; and the
    committed versions newer than it that did not, each with why."""
    damaged: dict[int, str] = {}
    for v in sorted(versions, reverse=True):
        if "json" not in versions[v]:
            continue
        try:
            return (v, *read_version(directory, v)), damaged
        except (ExpertError, OSError) as e:
            damaged[v] = str(getattr(e, "message", e))
            log.warning("expert %s v%d is damaged (%s); trying an older version", directory.name, v, damaged[v])
    return None, damaged


def quarantine(root: Path, directory: Path, damaged: dict[int, str]) -> Path:
    """Move the files of the ``damaged`` versions of ``directory`` (version -> why) into a fresh folder
    of the quarantine, with a note saying what they are; returns that folder."""
    dest = root / QUARANTINE / f"{directory.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    dest.mkdir(parents=True)
    for v in damaged:
        for ext in ("json", "safetensors"):
            src = version_file(directory, v, ext)
            if src.exists():
                os.replace(src, dest / src.name)
    note = {"name": directory.name, "versions": {str(v): why for v, why in damaged.items()},
            "quarantined": int(time.time())}
    (dest / QUARANTINE_NOTE).write_text(json.dumps(note, indent=1))
    return dest


def quarantined(root: Path) -> list[dict]:
    """Every quarantined folder's note (name, versions with why, when), with its path in the store, oldest
    first."""
    found = []
    for note in sorted((root / QUARANTINE).glob(f"*/{QUARANTINE_NOTE}")):
        path = f"{QUARANTINE}/{note.parent.name}"
        try:
            found.append({**json.loads(note.read_text()), "path": path})
        except (OSError, ValueError):
            found.append({"name": note.parent.name, "versions": {}, "quarantined": None, "path": path})
    return sorted(found, key=lambda q: q.get("quarantined") or 0)


def remove_versions(directory: Path, keep: int) -> None:
    """Files of every version but ``keep`` (older ones replaced, newer ones never committed)."""
    for p in directory.iterdir():
        m = VERSION_RE.fullmatch(p.name)
        if m and int(m.group(1)) != keep:
            p.unlink(missing_ok=True)


def sweep(root: Path) -> None:
    """Remove deleted experts still in the trash, staged tensors never committed, and temporary files of
    atomic writes in the store folder itself (the ``.generation`` counter's) (recovery only)."""
    for p in root.iterdir():
        if p.name.startswith(TRASH_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file():
            p.unlink(missing_ok=True)
    shutil.rmtree(root / INCOMING, ignore_errors=True)
