"""Keeps a server's view of a shared expert folder current: a daemon thread that calls
``ExpertStore.refresh`` every ``interval`` seconds.

Polling, not file-system events: inotify does not report changes made by other hosts on NFS or other
network volumes, while reading one small file (``.generation``) per interval works on every volume and
costs nothing measurable. An upload, replacement or deletion through any process is therefore served
(or refused) by every process within ``interval`` plus the time to read and validate the new version
(milliseconds for SVF vectors). Every ``full_scan_every`` seconds the records are re-read even if the
generation did not move: that catches a writer killed between its commit and its announcement.
"""
from __future__ import annotations

import logging
import threading
import time

from experts.store.expert_store import ExpertStore

log = logging.getLogger("t2serve.experts")


class StoreWatcher:
    def __init__(self, store: ExpertStore, interval: float = 1.0, full_scan_every: float = 60.0):
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.store = store
        self.interval = interval
        self.full_scan_every = full_scan_every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "StoreWatcher":
        self._thread = threading.Thread(target=self._run, name="expert-store-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        last_full, failing = time.monotonic(), False
        while not self._stop.wait(self.interval):
            full = time.monotonic() - last_full >= self.full_scan_every
            try:
                self.store.refresh(force=full)
            except Exception:  # a volume that went away for a moment must not end the watching
                if not failing:  # once per outage, not once per interval
                    log.exception("re-reading the expert store failed; retrying every %g s", self.interval)
                failing = True
                continue
            if failing:
                log.info("re-reading the expert store works again")
            failing = False
            if full:
                last_full = time.monotonic()
