"""Keeping one process's view of a shared store folder current.

Several processes (server replicas, ``t2serve experts`` and training tools) may share one folder, local
or on a shared volume (``lock``):
- Every write (and the recovery at start) holds the file lock ``.lock`` from staging to announcement,
  catches up with the folder first (``ExpertStore.refresh``), numbers the version after the newest on
  disk, and ends by adding one to ``.generation`` (``SeenGeneration.announce``). Staging inside the lock
  lets recovery remove whatever it finds in ``.incoming``: no live writer has files there while another
  process holds the lock.
- Readers never lock: ``refresh`` (run by ``StoreWatcher`` every ``store_poll_interval``) reads the
  generation and, when it moved, each name's newest record (``scan_folder``); a version is published only
  when its tensor file matches the record's size and sha256, so a half-written or concurrently replaced
  file is never served (it is retried at the next poll, the copy in memory kept meanwhile). A name whose
  folder is gone is dropped: requests already running finish with their copy, new ones get 404.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from experts.store.errors import ExpertError
from experts.store.lock import Generation
from experts.store.mixtures import parts_first
from experts.store.records import NAME_RE, ExpertRecord
from experts.store.version_files import list_versions, name_dirs, read_version, version_file

log = logging.getLogger("t2serve.experts")

MAX_FAILED_SCANS = 3  # re-reads of an unreadable newest version before waiting for the next change


class SeenGeneration:
    """The generation of the folder this process's view reflects, and whether to read the folder again."""

    def __init__(self, root: str | os.PathLike):
        self._generation = Generation(root)
        self.seen: int | None = None  # None: never read
        self._failed_scans = 0  # consecutive scans that left an unreadable version behind

    def read(self) -> int:
        """The folder's generation now (read it before the records: a later write moves it again)."""
        return self._generation.read()

    def behind(self, generation: int) -> bool:
        return generation != self.seen

    def scanned(self, generation: int, complete: bool) -> None:
        """The folder was read at ``generation``; an incomplete read is retried a few times before the
        view waits for the next change (a damaged version must not cost a full read every poll)."""
        if complete or self._failed_scans + 1 >= MAX_FAILED_SCANS:
            self.seen, self._failed_scans = generation, 0
        else:
            self._failed_scans += 1  # the next call reads the folder again

    def announce(self) -> None:
        """Tell the other processes that the folder changed (the caller holds the lock)."""
        new = self._generation.bump()
        if self.seen == new - 1:  # this view was current; one behind stays behind (read again later)
            self.seen = new


@dataclass
class FolderScan:
    """What the folder holds that the view in memory does not."""

    gone: list[str]  # names in memory whose folder is gone
    fresh: list[tuple[ExpertRecord, dict]]  # new or replaced versions, read and checked, parts first
    newest: dict[str, int]  # per name with a committed version: the newest one's number
    complete: bool  # every name read completely


def scan_folder(root: Path, known: Mapping[str, ExpertRecord], remove_temps: bool) -> FolderScan:
    """Compare each name's newest committed version with ``known`` (the records in memory). When the
    newest cannot be read (replaced or deleted while read, or damaged), the scan is incomplete and the
    copy in memory stays until a later scan succeeds. ``remove_temps``: see ``list_versions``."""
    listed = {d.name: d for d in name_dirs(root) if NAME_RE.fullmatch(d.name)}
    gone = [n for n in known if n not in listed and not (root / n).is_dir()]
    fresh: list[tuple[ExpertRecord, dict]] = []
    newest: dict[str, int] = {}
    complete = True
    for name, directory in listed.items():
        committed = [v for v, exts in list_versions(directory, remove_temps).items() if "json" in exts]
        current = known.get(name)
        if not committed:  # being created (or re-created after a delete): its writer announces it
            complete = complete and current is None
            continue
        v = newest[name] = max(committed)
        try:
            record = ExpertRecord.from_json(version_file(directory, v, "json").read_bytes())
            if current is not None and current == record:
                continue
            fresh.append(read_version(directory, v))
        except (ExpertError, OSError) as e:
            complete = False
            log.info("expert %s v%d not read yet (%s)", name, v, getattr(e, "message", e))
    return FolderScan(gone, parts_first(fresh), newest, complete)
