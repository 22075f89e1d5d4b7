"""The expert store: every expert on disk, versioned, loaded at start, and published to the registry.

``ExpertStore`` coordinates three parts: the files of each version (``version_files``, which describes
the layout), keeping up with other processes sharing the folder (``sync``), and mixtures that depend on
other experts (``mixtures``). A version exists once its JSON record does. Writing one, under the lock:
tensors to ``.incoming`` (fsync'ed), renamed into ``<name>/``, the record written atomically (the commit),
published to the registry, older versions removed. Deleting renames the folder to a trash name (one
atomic step) before removing it. At start, ``load`` picks per name the newest version whose
record parses and whose tensor file matches the record's size and sha256, deletes leftovers of
interrupted writes (temporary files, uncommitted tensors, older versions, trash), moves committed versions
that are damaged (record or tensors not matching) into the quarantine, and validates every
expert against the served model again: experts for other weights or other matrices stay on disk, listed
as ``incompatible``, and are not served.

Consistency: registry entries are replaced whole, so a request that already resolved its Adaptation
keeps the tensors of the version it started with; a deleted or replaced expert is gone from the
registry before the call returns. One lock serialises writes (they take milliseconds; mixtures make
names depend on each other, so a per-name lock would not be enough). The lock is a file lock too:
every write (and the recovery at start) holds it from staging to announcement and catches up with the
folder first (``refresh``), so processes sharing the folder number versions in turn (see ``sync``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from adapters.adaptation import SVFExpert
from adapters.atomic import atomic_write, fsync_dir, write_temp
from adapters.sapt import SAPTBundle
from experts.store.base_model import BaseModelInfo
from experts.store.errors import ExpertError, not_found
from experts.store.lock import StoreLock
from experts.store.mixtures import check_dependents, dependents, mixed, parts_first
from experts.store.records import NAME_RE, ExpertRecord, check_name
from experts.store.registry import ExpertRegistry
from experts.store.stored import StoredExpert
from experts.store.sync import SeenGeneration, scan_folder
from experts.store.tensor_files import to_safetensors
from experts.store.validation import ExpertDraft, PreparedExpert, draft_from_record, prepare, with_version_id
from experts.store.version_files import (
    INCOMING,
    list_versions,
    name_dirs,
    newest_readable,
    quarantine,
    quarantined,
    remove_versions,
    sweep,
    trash_path,
    version_file,
)

log = logging.getLogger("t2serve.experts")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class ExpertStore:
    def __init__(self, root: str | os.PathLike, registry: ExpertRegistry | None = None,
                 base: BaseModelInfo | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 lock_timeout: float = 30.0):
        self.root = Path(root)
        self.registry = registry if registry is not None else ExpertRegistry()
        self.base = base
        self.max_bytes = max_bytes
        self._lock = StoreLock(self.root, lock_timeout)
        self._sync = SeenGeneration(self.root)
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
            return s.record, version_file(self.root / name, s.record.version, "safetensors").read_bytes()

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
            payload = mixed(prepared, self._experts)
            parametrization, targets = payload.parametrization, tuple(payload.z)
        check_dependents(name, payload, self._experts)
        directory = self.root / name
        if not directory.exists():
            directory.mkdir(parents=True)
            fsync_dir(self.root)
        version = max(self._next_version.get(name, 1), max(self._versions(directory), default=0) + 1)
        record = prepared.record(version=version, sha256=sha, size=size, created=int(time.time()),
                                 base=self.base, parametrization=parametrization, targets=targets)
        # No fsync of the folder for this rename: the record's atomic write below fsyncs the same folder,
        # which makes both new entries durable, and before the record exists the tensors are not a version.
        os.replace(tmp, version_file(directory, version, "safetensors"))
        atomic_write(version_file(directory, version, "json"), record.to_json().encode())  # the commit point
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
            users = dependents(name, self._experts)
            if users:
                raise ExpertError(f"Expert {name!r} is part of mixture(s) {', '.join(users)}; delete those first.",
                                  code="expert_in_use", status=409, param="name")
            trash = trash_path(self.root, name)
            os.replace(self.root / name, trash)  # one atomic step: gone from disk for any restart
            fsync_dir(self.root)
            self._announce()
            self._drop(name)
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
            seen = self._sync.read()  # before reading: a write after this is seen at the next poll
            if recover:
                sweep(self.root)
            found = []
            for directory in name_dirs(self.root):
                if not NAME_RE.fullmatch(directory.name):
                    log.warning("ignoring %s: not an expert name", directory)
                    continue
                item = self._load_name(directory)
                if item is not None:
                    found.append(item)
            for record, tensors in parts_first(found):
                self._publish(self._validated(record, tensors))
            self._sync.seen = seen
            if recover:
                self._announce()  # recovery may have removed files: the others look again
            ready = sum(s.ready for s in self._experts.values())
            log.info("%d expert(s) loaded from %s (%d ready)", len(self._experts), self.root, ready)
            return self.list()

    def _versions(self, directory: Path) -> dict[int, set[str]]:
        # Unfinished temporary files are only removed by a recovering store inside the lock: then no
        # writer of any process can be between writing one and renaming it.
        return list_versions(directory, remove_temps=self._recover and self._lock.held)

    def quarantined(self) -> list[dict]:
        """Damaged versions moved aside at a start: per folder, the name, versions with why, when, where."""
        return quarantined(self.root)

    def _load_name(self, directory: Path) -> tuple[ExpertRecord, dict] | None:
        versions = self._versions(directory)
        self._next_version[directory.name] = max(versions, default=0) + 1  # never reuse a number
        chosen, damaged = newest_readable(directory, versions)
        if damaged and self._recover:
            where = quarantine(self.root, directory, damaged)
            log.error("expert %s: damaged version(s) %s moved to %s (not served; nothing deleted)", directory.name,
                      ", ".join(map(str, damaged)), where)
        if chosen is None:
            log.warning("no intact committed version of expert %s; removing its uncommitted files", directory.name)
            if self._recover:
                shutil.rmtree(directory, ignore_errors=True)
            return None
        if self._recover:
            self._remove_versions(directory, keep=chosen[0])
        return chosen[1], chosen[2]

    def _validated(self, record: ExpertRecord, tensors: dict) -> StoredExpert:
        """A stored version checked against the served model, as an upload would be."""
        try:
            prepared = with_version_id(prepare(draft_from_record(record, tensors), self.base), record.sha256)
            payload = prepared.payload
            if record.kind == "mixture":
                payload = mixed(prepared, self._experts)
            return StoredExpert(record, "ready", None, payload, prepared)
        except ExpertError as e:
            status = "unavailable" if e.code in ("expert_not_found", "invalid_mixture") else "incompatible"
            log.warning("expert %s v%d is not served: %s", record.name, record.version, e.message)
            return StoredExpert(record, status, e.message, None, None)

    def _remove_versions(self, directory: Path, keep: int) -> None:
        remove_versions(directory, keep)  # a method: the crash tests stop a write right here

    # --- other processes sharing the folder ----------------------------------------------------------

    @contextmanager
    def _synced(self):
        """Exclusive access to the folder, with this view caught up with it first."""
        with self._lock.exclusive():
            self.refresh()
            yield

    def _announce(self) -> None:
        """Tell the other processes that the folder changed (the caller holds the lock)."""
        self._sync.announce()

    def refresh(self, force: bool = False) -> bool:
        """Catch up with what other processes wrote: when the generation moved since the last look (or
        with ``force``), publish new and replaced versions and drop deleted names. True if anything
        changed. Cheap when nothing did: one small file read."""
        with self._lock.thread_lock:
            generation = self._sync.read()  # before the records: a later write moves it again
            if not self._sync.behind(generation) and not force:
                return False
            changed, complete = self._rescan()
            self._sync.scanned(generation, complete)
            return changed

    def _rescan(self) -> tuple[bool, bool]:
        """(anything changed, every name read completely): apply what ``scan_folder`` found."""
        scan = scan_folder(self.root, {n: s.record for n, s in self._experts.items()},
                           remove_temps=self._recover and self._lock.held)
        complete = scan.complete
        for name, v in scan.newest.items():
            self._next_version[name] = max(self._next_version.get(name, 1), v + 1)
        for name in scan.gone:
            self._drop(name)
            log.info("expert %s deleted by another process", name)
        for record, tensors in scan.fresh:  # parts first
            self._publish(self._validated(record, tensors))
            try:
                self._refresh_dependents(record.name)
            except ExpertError as e:  # a mixture whose new parts are not all read yet
                complete = False
                log.info("mixtures of %s not re-mixed yet (%s)", record.name, e.message)
            log.info("expert %s v%d loaded (written by another process)", record.name, record.version)
        return bool(scan.gone or scan.fresh), complete

    # --- the registry and mixtures -------------------------------------------------------------------

    def _publish(self, stored: StoredExpert) -> None:
        # Copy on write (as the registry does): readers iterate a dict no writer changes under them.
        self._experts = {**self._experts, stored.name: stored}
        if stored.ready and isinstance(stored.payload, SVFExpert):
            self.registry.put(stored.payload, stored.record.summary())  # replaced whole
        else:
            self.registry.remove(stored.name)  # sapt bundles are served by pass 1, not by name

    def _drop(self, name: str) -> None:
        self.registry.remove(name)
        self._experts = {k: v for k, v in self._experts.items() if k != name}
        self._next_version.pop(name, None)

    def _refresh_dependents(self, name: str) -> None:
        """Re-mix the mixtures built on ``name`` with its new version."""
        for user in dependents(name, self._experts):
            s = self._experts[user]
            if s.prepared is not None:
                self._publish(StoredExpert(s.record, "ready", None, mixed(s.prepared, self._experts), s.prepared))


def too_large(size: int, limit: int) -> ExpertError:
    return ExpertError(f"The expert is {size} bytes; the limit (T2_MAX_EXPERT_BYTES) is {limit} bytes.",
                       code="expert_too_large", status=413, param="tensors")
