"""What several processes sharing one expert folder agree on: one writer at a time, and a counter of
committed changes.

- ``StoreLock``: a thread lock (writers of this process) around an OS file lock on ``<store>/.lock``
  (``filelock``: ``flock`` on Unix; on NFS the Linux client maps it onto NFS byte-range locks). The OS
  drops the file lock when its holder dies, SIGKILL included, so a crashed writer never blocks the
  others. Re-entrant within a thread; a writer that waits longer than ``timeout`` gets a 503.
- ``Generation``: ``<store>/.generation`` holds an integer that every write adds one to, under the lock,
  after all its files are in place. Other processes poll it (one small read) and re-read the records
  only when it moved. It is replaced atomically, so a reader sees the old number or the new one.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from adapters.atomic import atomic_write
from experts.store.errors import ExpertError

log = logging.getLogger("t2serve.experts")

LOCK_FILE = ".lock"
GENERATION_FILE = ".generation"
CONTROL_FILES = (LOCK_FILE, GENERATION_FILE)  # in the store folder beside the experts, never removed


class StoreLock:
    """Exclusive access to one store folder across threads and processes."""

    def __init__(self, root: str | os.PathLike, timeout: float = 30.0):
        self.root = Path(root)
        self.timeout = timeout
        self.thread_lock = threading.RLock()  # also guards the in-memory view of the store
        # One holder per process at a time (the thread lock sees to it), so no per-thread file locks.
        self._file = FileLock(self.root / LOCK_FILE, timeout=timeout, thread_local=False)

    @contextmanager
    def exclusive(self, patient: bool = False) -> Iterator[None]:
        """``patient``: wait as long as it takes (a server's start), logging once past the timeout."""
        with self.thread_lock:
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                self._file.acquire(poll_interval=0.01)
            except Timeout as e:
                if not patient:
                    raise ExpertError(f"Another server holds the expert store lock for more than {self.timeout:g} "
                                      "s; retry shortly.", code="store_busy", status=503) from e
                log.warning("waiting for the lock of %s, held by another process for %g s already", self.root,
                            self.timeout)
                self._file.acquire(timeout=-1, poll_interval=0.05)
            try:
                yield
            finally:
                self._file.release()

    @property
    def held(self) -> bool:
        """True while this process holds the file lock."""
        return self._file.is_locked


class Generation:
    """The store's change counter (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / GENERATION_FILE

    def read(self) -> int:
        """The current number: 0 before the first write, -1 if the file is not a number (then every poll
        re-reads the records until the next write rewrites it)."""
        try:
            return int(self.path.read_bytes())
        except FileNotFoundError:
            return 0
        except ValueError:
            return -1

    def bump(self) -> int:
        """Add one (the caller holds the store lock); returns the new number."""
        new = max(self.read(), 0) + 1
        atomic_write(self.path, b"%d\n" % new)
        return new
