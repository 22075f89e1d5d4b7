"""A training child's tie to the server that started it: it dies with the server, and a server that starts
after a crash ends what a dead server left running.

- ``die_with_parent`` (in the child, first thing): the kernel kills it when the server's process ends
  (``PR_SET_PDEATHSIG``), however the server ends, SIGKILL included.
- ``record_child`` (in the server): ``child.json`` in the run folder names the child (pid and start time,
  so a recycled pid is never taken for it) and the server it belongs to.
- ``end_leftovers`` (in a starting server): every recorded child whose server is gone is killed with its
  process group, and its record removed. A child of a server still running (a replica sharing the cache
  folder) is left alone.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

PARENT_ENV = "T2_PARENT_PID"  # set by the server for its training children
RECORD = "child.json"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """If started by a server (``T2_PARENT_PID``), have the kernel SIGKILL this process when the server's
    process ends; exit at once if it has ended already."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(parent):  # the server died before the line above: nobody waits for this run
        os._exit(1)


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat), or None when it has ended (or
    is a zombie, which is as good as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime 22
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _same(pid: int | None, started: int | None) -> bool:
    """Whether the process ``pid`` that started at ``started`` still runs."""
    return pid is not None and started is not None and start_time(pid) == started


def record_child(run_dir: Path, pid: int, job: dict) -> None:
    """Write ``child.json`` for the child ``pid`` of this process (``job``: what to report if it is left over)."""
    record = {"pid": pid, "started": start_time(pid), "server_pid": os.getpid(),
              "server_started": start_time(os.getpid()), "host": socket.gethostname(), "job": job}
    tmp = run_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, run_dir / RECORD)


def forget_child(run_dir: Path) -> None:
    """The child has ended and its server knows: remove its record."""
    (run_dir / RECORD).unlink(missing_ok=True)


def end_leftovers(root: Path, wait_s: float = 5.0) -> list[dict]:
    """Kill the children recorded under ``root``/*/ whose server has ended (their whole process group) and
    remove their records; one report per record removed: the run folder's name (the job id), the record's
    ``job``, and whether a process was still running."""
    reports = []
    for path in sorted(root.glob(f"*/{RECORD}")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a record being written, or not ours: left for whoever wrote it
        if rec.get("host") != socket.gethostname() or _same(rec.get("server_pid"), rec.get("server_started")):
            continue  # another machine's pids, or a server still running
        pid, running = rec.get("pid"), _same(rec.get("pid"), rec.get("started"))
        if running:
            try:
                os.killpg(pid, signal.SIGKILL)  # the child leads its own group: its helpers go too
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait_s
            while _same(pid, rec["started"]) and time.monotonic() < deadline:
                time.sleep(0.05)
        path.unlink(missing_ok=True)
        reports.append({"job_id": path.parent.name, "job": rec.get("job") or {}, "pid": pid, "was_running": running})
    return reports
