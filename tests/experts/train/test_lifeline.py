"""A training child's tie to its server: it dies with the server (parent-death signal), and a starting
server ends the children a dead server left (by their record, never a recycled pid or a live server's)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from experts.train.lifeline import PARENT_ENV, RECORD, end_leftovers, record_child, start_time
from tests.support import REPO_ROOT

# A "server" that starts a child which ties itself to it, prints the child's pid, then waits.
_SERVER = f"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "from experts.train.lifeline import die_with_parent; die_with_parent(); import time; time.sleep(60)"],
    env=dict(os.environ, {PARENT_ENV}=str(os.getpid())), start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_child_dies_when_its_server_is_killed():
    server = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    child = int(server.stdout.readline())
    try:
        time.sleep(1.0)  # the child has run die_with_parent by now
        assert start_time(child) is not None
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert _gone(child), "the child outlived its SIGKILLed server"
    finally:
        server.kill()
        if start_time(child) is not None:
            os.kill(child, signal.SIGKILL)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_starting_server_ends_children_of_a_dead_server_only(tmp_path):
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a child whose tie did not hold
    mine = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a child of a server still running
    try:
        (tmp_path / "adapt-orphan").mkdir()
        record_child(tmp_path / "adapt-orphan", orphan.pid, {"name": "skills"})
        rec = json.loads((tmp_path / "adapt-orphan" / RECORD).read_text())
        rec["server_pid"] = _dead_pid()  # its server has ended
        (tmp_path / "adapt-orphan" / RECORD).write_text(json.dumps(rec))
        (tmp_path / "adapt-live").mkdir()
        record_child(tmp_path / "adapt-live", mine.pid, {"name": "other"})  # this process is its server
        (tmp_path / "adapt-recycled").mkdir()  # a dead server's child whose pid now names another process
        (tmp_path / "adapt-recycled" / RECORD).write_text(json.dumps(
            {**rec, "pid": mine.pid, "started": start_time(mine.pid) - 1}))

        reports = end_leftovers(tmp_path)

        assert orphan.wait(5) == -signal.SIGKILL
        assert mine.poll() is None  # neither the live server's child nor a recycled pid is touched
        assert sorted((r["job_id"], r["was_running"]) for r in reports) == [("adapt-orphan", True),
                                                                            ("adapt-recycled", False)]
        assert next(r for r in reports if r["job_id"] == "adapt-orphan")["job"] == {"name": "skills"}
        assert not (tmp_path / "adapt-orphan" / RECORD).exists() and (tmp_path / "adapt-live" / RECORD).exists()
        assert end_leftovers(tmp_path) == []
    finally:
        for p in (orphan, mine):
            p.kill()
            p.wait()
