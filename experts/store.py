"""The expert store: every expert on disk, versioned, loaded at start, and published to the registry.

Layout under the store folder (``Settings.resolved_expert_dir()``):
    <name>/v000003.safetensors   the tensors of version 3 (re-serialised by the server)
    <name>/v000003.json          its metadata record, written last: the version's commit point
    .incoming/                   fully written tensor files waiting for their commit
    .trash-<name>-<id>/          a deleted expert on its way out
A version exists once its JSON record does. Writing one: tensors to ``.incoming`` (fsync'ed) outside
the lock; then, under the lock, rename them into ``<name>/``, write the record atomically (the commit),
publish to the registry, and remove older versions. Deleting renames the folder to a trash name (one
atomic step) before removing it. At start, ``load`` picks per name the newest version whose record
parses and whose tensor file matches the record's size and sha256, deletes leftovers of interrupted
writes (temporary files, uncommitted tensors, older versions, trash), and validates every expert
against the served model again: experts for other weights or other matrices stay on disk, listed as
``incompatible``, and are not served.

Consistency: registry entries are replaced whole, so a request that already resolved its Adaptation
keeps the tensors of the version it started with; a deleted or replaced expert is gone from the
registry before the call returns. One lock serialises writes (they take milliseconds; mixtures make
names depend on each other, so a per-name lock would not be enough).

Several processes (server replicas, ``t2serve experts`` and training tools) may share one folder,
local or on a shared volume (``store_lock.py``):
- Every write (and the recovery at start) holds the file lock ``.lock`` from staging to announcement,
  catches up with the folder first (``refresh``), numbers the version after the newest on disk, and ends
  by adding one to ``.generation``. Staging inside the lock lets recovery remove whatever it finds in
  ``.incoming``: no live writer has files there while another process holds the lock.
- Readers never lock: ``refresh`` (run by ``StoreWatcher`` every ``store_poll_interval``) reads the
  generation and, when it moved, each name's newest record; a version is published only when its tensor
  file matches the record's size and sha256, so a half-written or concurrently replaced file is never
  served (it is retried at the next poll, the copy in memory kept meanwhile). A name whose folder is
  gone is dropped: requests already running finish with their copy, new ones get 404.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from adapters.adaptation import SVFExpert
from adapters.sapt import SAPTBundle
from experts.atomic import TMP_SUFFIX, atomic_write, fsync_dir, write_temp
from experts.base_model import BaseModelInfo
from experts.errors import ExpertError, not_found
from experts.records import NAME_RE, ExpertRecord, check_name
from experts.registry import ExpertRegistry
from experts.store_lock import Generation, StoreLock
from experts.tensor_files import read_safetensors, to_safetensors
from experts.validation import (ExpertDraft, PreparedExpert, draft_from_record, mix_components, prepare,
                                with_version_id)

log = logging.getLogger("t2serve.experts")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_VERSION_RE = re.compile(r"v(\d{6,})\.(json|safetensors)")
INCOMING = ".incoming"
MAX_FAILED_SCANS = 3  # re-reads of an unreadable newest version before waiting for the next change


@dataclass(frozen=True)
class StoredExpert:
    record: ExpertRecord
    status: str = "ready"  # ready | incompatible (does not fit the served model) | unavailable (mixture parts)
    reason: str | None = None  # why it is not ready
    payload: SVFExpert | SAPTBundle | None = None  # what is served: svf and mixture -> SVFExpert, sapt -> bundle
    prepared: PreparedExpert | None = field(default=None, repr=False)  # mixtures: to re-mix when parts change

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def ready(self) -> bool:
        return self.status == "ready"


def _file(directory: Path, version: int, ext: str) -> Path:
    return directory / f"v{version:06d}.{ext}"


class ExpertStore:
    def __init__(self, root: str | os.PathLike, registry: ExpertRegistry | None = None,
                 base: BaseModelInfo | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 lock_timeout: float = 30.0):
        self.root = Path(root)
        self.registry = registry if registry is not None else ExpertRegistry()
        self.base = base
        self.max_bytes = max_bytes
        self._lock = StoreLock(self.root, lock_timeout)
        self._generation = Generation(self.root)
        self._seen = None  # the generation this view reflects (None: never read)
        self._failed_scans = 0  # consecutive scans that left an unreadable version behind
        self._experts: dict[str, StoredExpert] = {}
        self._next_version: dict[str, int] = {}  # per name: never hand out a lower number again
        self._recover = True

    # --- reading -------------------------------------------------------------------------------------

    def get(self, name: str) -> StoredExpert | None:
        return self._experts.get(name)

    def list(self) -> list[StoredExpert]:
        return sorted(self._experts.values(), key=lambda s: s.name)

    def bundle(self, name: str) -> SAPTBundle | None:
        """A ready SAPT bundle by name (for the sapt pass-1 strategy)."""
        s = self._experts.get(name)
        return s.payload if s is not None and s.ready and isinstance(s.payload, SAPTBundle) else None

    def bundles(self) -> list[StoredExpert]:
        return [s for s in self.list() if s.ready and s.record.kind == "sapt"]

    def read_file(self, name: str) -> tuple[ExpertRecord, bytes]:
        """The current version's record and tensor file bytes (export, download)."""
        with self._synced():  # not while a replacement, here or in another process, removes the file
            s = self._experts.get(name)
            if s is None:
                raise not_found(name)
            return s.record, _file(self.root / name, s.record.version, "safetensors").read_bytes()

    # --- writing -------------------------------------------------------------------------------------

    def put(self, draft: ExpertDraft) -> StoredExpert:
        """Validate ``draft`` and store it as the next version of its name; served once this returns."""
        check_name(draft.name)
        if self.base is not None and draft.name == self.base.name:
            raise ExpertError(f"{draft.name!r} is the served model's name; choose another expert name.",
                              code="invalid_name", param="name")
        prepared = prepare(draft, self.base)
        data = to_safetensors(prepared.tensors)
        if len(data) > self.max_bytes:
            raise too_large(len(data), self.max_bytes)
        sha = hashlib.sha256(data).hexdigest()
        with_version_id(prepared, sha)
        with self._synced():
            tmp = write_temp(self.root / INCOMING, data, prefix=draft.name + ".")
            try:
                return self._commit(prepared, tmp, sha, len(data))
            finally:
                tmp.unlink(missing_ok=True)

    def _commit(self, prepared: PreparedExpert, tmp: Path, sha: str, size: int) -> StoredExpert:
        name = prepared.draft.name
        payload, parametrization, targets = prepared.payload, None, None
        if prepared.draft.kind == "mixture":
            payload = mix_components(prepared, self._components(prepared))
            parametrization, targets = payload.parametrization, tuple(payload.z)
        self._check_dependents(name, payload)
        directory = self.root / name
        if not directory.exists():
            directory.mkdir(parents=True)
            fsync_dir(self.root)
        version = max(self._next_version.get(name, 1), max(self._versions(directory), default=0) + 1)
        record = prepared.record(version=version, sha256=sha, size=size, created=int(time.time()),
                                 base=self.base, parametrization=parametrization, targets=targets)
        # No fsync of the folder for this rename: the record's atomic write below fsyncs the same folder,
        # which makes both new entries durable, and before the record exists the tensors are not a version.
        os.replace(tmp, _file(directory, version, "safetensors"))
        atomic_write(_file(directory, version, "json"), record.to_json().encode())  # the commit point
        self._next_version[name] = version + 1
        stored = StoredExpert(record, "ready", None, payload, prepared)
        self._publish(stored)
        self._refresh_dependents(name)
        self._remove_versions(directory, keep=version)
        self._announce()
        log.info("expert %s v%d stored (%s, %d bytes)", name, version, record.kind, size)
        return stored

    def delete(self, name: str) -> StoredExpert:
        with self._synced():
            stored = self._experts.get(name)
            if stored is None:
                raise not_found(name)
            users = self._dependents(name)
            if users:
                raise ExpertError(f"Expert {name!r} is part of mixture(s) {', '.join(users)}; delete those first.",
                                  code="expert_in_use", status=409, param="name")
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(self.root / name, trash)  # one atomic step: gone from disk for any restart
            fsync_dir(self.root)
            self._announce()
            self.registry.remove(name)
            self._experts = {k: v for k, v in self._experts.items() if k != name}
            self._next_version.pop(name, None)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("expert %s deleted", name)
        return stored

    # --- start ---------------------------------------------------------------------------------------

    def load(self, recover: bool = True) -> list[StoredExpert]:
        """Recover the folder after any crash and publish every valid expert (see the module docstring).
        ``recover=False`` only reads (tools that run beside a server must not remove its files in flight)."""
        self._recover = recover
        # Recovery removes files, so it waits for any writer of another process to finish; reading does not.
        with self._lock.exclusive(patient=True) if recover else self._lock.thread_lock:
            self.root.mkdir(parents=True, exist_ok=True)
            seen = self._generation.read()  # before reading: a write after this is seen at the next poll
            if recover:
                self._sweep()
            found = []
            for directory in self._name_dirs():
                if not NAME_RE.fullmatch(directory.name):
                    log.warning("ignoring %s: not an expert name", directory)
                    continue
                item = self._load_name(directory)
                if item is not None:
                    found.append(item)
            for record, tensors in sorted(found, key=lambda rt: rt[0].kind == "mixture"):  # parts first
                self._publish(self._validated(record, tensors))
            self._seen = seen
            if recover:
                self._announce()  # recovery may have removed files: the others look again
            ready = sum(s.ready for s in self._experts.values())
            log.info("%d expert(s) loaded from %s (%d ready)", len(self._experts), self.root, ready)
            return self.list()

    def _sweep(self) -> None:
        for p in self.root.iterdir():
            if p.name.startswith(".trash-"):
                shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(self.root / INCOMING, ignore_errors=True)

    def _versions(self, directory: Path) -> dict[int, set[str]]:
        """Version number -> the extensions present ({"json", "safetensors"} for a complete one)."""
        versions: dict[int, set[str]] = {}
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:  # deleted meanwhile, or not created yet
            return versions
        for p in entries:
            m = _VERSION_RE.fullmatch(p.name)
            if m:
                versions.setdefault(int(m.group(1)), set()).add(m.group(2))
            elif p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and self._recover and self._lock.held:
                p.unlink(missing_ok=True)  # an atomic write that never finished
        return versions

    def _name_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _load_name(self, directory: Path) -> tuple[ExpertRecord, dict] | None:
        versions = self._versions(directory)
        self._next_version[directory.name] = max(versions, default=0) + 1  # never reuse a number
        chosen = None
        for v in sorted(versions, reverse=True):
            if "json" not in versions[v]:
                continue
            try:
                chosen = (v, *self._read_version(directory, v))
                break
            except (ExpertError, OSError) as e:
                log.warning("expert %s v%d is unusable (%s); trying an older version", directory.name, v,
                            getattr(e, "message", e))
        if chosen is None:
            log.warning("no complete version of expert %s; removing its leftovers", directory.name)
            if self._recover:
                shutil.rmtree(directory, ignore_errors=True)
            return None
        if self._recover:
            self._remove_versions(directory, keep=chosen[0])
        return chosen[1], chosen[2]

    def _read_version(self, directory: Path, v: int) -> tuple[ExpertRecord, dict]:
        record = ExpertRecord.from_json(_file(directory, v, "json").read_bytes())
        data = _file(directory, v, "safetensors").read_bytes()
        if record.name != directory.name or record.version != v:
            raise ExpertError(f"record names {record.name} v{record.version}")
        if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.sha256:
            raise ExpertError("tensor file does not match the record's size and sha256")
        return record, read_safetensors(data, "the stored tensor file")

    def _validated(self, record: ExpertRecord, tensors: dict) -> StoredExpert:
        """A stored version checked against the served model, as an upload would be."""
        try:
            prepared = with_version_id(prepare(draft_from_record(record, tensors), self.base), record.sha256)
            payload = prepared.payload
            if record.kind == "mixture":
                payload = mix_components(prepared, self._components(prepared))
            return StoredExpert(record, "ready", None, payload, prepared)
        except ExpertError as e:
            status = "unavailable" if e.code in ("expert_not_found", "invalid_mixture") else "incompatible"
            log.warning("expert %s v%d is not served: %s", record.name, record.version, e.message)
            return StoredExpert(record, status, e.message, None, None)

    def _remove_versions(self, directory: Path, keep: int) -> None:
        """Files of every version but ``keep`` (older ones replaced, newer ones never committed)."""
        for p in directory.iterdir():
            m = _VERSION_RE.fullmatch(p.name)
            if m and int(m.group(1)) != keep:
                p.unlink(missing_ok=True)

    # --- other processes sharing the folder ----------------------------------------------------------

    @contextmanager
    def _synced(self):
        """Exclusive access to the folder, with this view caught up with it first."""
        with self._lock.exclusive():
            self.refresh()
            yield

    def _announce(self) -> None:
        """Tell the other processes that the folder changed (the caller holds the lock)."""
        new = self._generation.bump()
        if self._seen == new - 1:  # this view was current; one behind stays behind (read again later)
            self._seen = new

    def refresh(self, force: bool = False) -> bool:
        """Catch up with what other processes wrote: when the generation moved since the last look (or
        with ``force``), publish new and replaced versions and drop deleted names. True if anything
        changed. Cheap when nothing did: one small file read."""
        with self._lock.thread_lock:
            generation = self._generation.read()  # before the records: a later write moves it again
            if generation == self._seen and not force:
                return False
            changed, complete = self._rescan()
            if complete or self._failed_scans + 1 >= MAX_FAILED_SCANS:
                self._seen, self._failed_scans = generation, 0
            else:
                self._failed_scans += 1  # the next call reads the folder again
            return changed

    def _rescan(self) -> tuple[bool, bool]:
        """(anything changed, every name read completely). Only the newest committed version of each name
        counts; when it cannot be read (replaced or deleted while read, or damaged), the copy in memory
        stays until a later scan succeeds."""
        listed = {d.name: d for d in self._name_dirs() if NAME_RE.fullmatch(d.name)}
        gone = [n for n in self._experts if n not in listed and not (self.root / n).is_dir()]
        fresh: list[tuple[ExpertRecord, dict]] = []
        complete = True
        for name, directory in listed.items():
            committed = [v for v, exts in self._versions(directory).items() if "json" in exts]
            current = self._experts.get(name)
            if not committed:  # being created (or re-created after a delete): its writer announces it
                complete = complete and current is None
                continue
            v = max(committed)
            self._next_version[name] = max(self._next_version.get(name, 1), v + 1)
            try:
                record = ExpertRecord.from_json(_file(directory, v, "json").read_bytes())
                if current is not None and current.record == record:
                    continue
                fresh.append(self._read_version(directory, v))
            except (ExpertError, OSError) as e:
                complete = False
                log.info("expert %s v%d not read yet (%s)", name, v, getattr(e, "message", e))
        for name in gone:
            self.registry.remove(name)
            self._experts = {k: v for k, v in self._experts.items() if k != name}
            self._next_version.pop(name, None)
            log.info("expert %s deleted by another process", name)
        for record, tensors in sorted(fresh, key=lambda rt: rt[0].kind == "mixture"):  # parts first
            self._publish(self._validated(record, tensors))
            try:
                self._refresh_dependents(record.name)
            except ExpertError as e:  # a mixture whose new parts are not all read yet
                complete = False
                log.info("mixtures of %s not re-mixed yet (%s)", record.name, e.message)
            log.info("expert %s v%d loaded (written by another process)", record.name, record.version)
        return bool(gone or fresh), complete

    # --- the registry and mixtures -------------------------------------------------------------------

    def _publish(self, stored: StoredExpert) -> None:
        # Copy on write (as the registry does): readers iterate a dict no writer changes under them.
        self._experts = {**self._experts, stored.name: stored}
        if stored.ready and isinstance(stored.payload, SVFExpert):
            self.registry.put(stored.payload, stored.record.summary())  # replaced whole
        else:
            self.registry.remove(stored.name)  # sapt bundles are served by pass 1, not by name

    def _components(self, prepared: PreparedExpert) -> list[SVFExpert]:
        parts = []
        for n in prepared.draft.experts:
            s = self._experts.get(n)
            if s is None:
                raise ExpertError(f"mixture {prepared.draft.name!r} names unknown expert {n!r}",
                                  code="expert_not_found", param="experts")
            if s.record.kind != "svf" or not s.ready:
                raise ExpertError(f"mixture {prepared.draft.name!r}: {n!r} is not a ready svf expert",
                                  code="invalid_mixture", param="experts")
            parts.append(s.payload)
        return parts

    def _dependents(self, name: str) -> list[str]:
        return sorted(s.name for s in self._experts.values()
                      if s.record.kind == "mixture" and name in s.record.spec.get("experts", ()))

    def _check_dependents(self, name: str, payload) -> None:
        """A replacement must keep the mixtures built on it valid (same matrices, parametrization)."""
        for user in self._dependents(name):
            s = self._experts[user]
            if s.prepared is None:
                continue
            parts = [payload if n == name else self._experts[n].payload for n in s.record.spec["experts"]]
            if not isinstance(payload, SVFExpert):
                raise ExpertError(f"{name!r} is part of mixture {user!r} and must stay an svf expert",
                                  code="expert_in_use", status=409, param="name")
            try:
                mix_components(s.prepared, parts)
            except ExpertError as e:
                raise ExpertError(f"replacing {name!r} would break mixture {user!r}: {e.message}",
                                  code="expert_in_use", status=409, param="name") from e

    def _refresh_dependents(self, name: str) -> None:
        for user in self._dependents(name):
            s = self._experts[user]
            if s.prepared is not None:
                mixed = mix_components(s.prepared, self._components(s.prepared))
                self._publish(StoredExpert(s.record, "ready", None, mixed, s.prepared))


def too_large(size: int, limit: int) -> ExpertError:
    return ExpertError(f"The expert is {size} bytes; the limit (T2_MAX_EXPERT_BYTES) is {limit} bytes.",
                       code="expert_too_large", status=413, param="tensors")
