"""The code sandbox: separate process, wall-clock and memory limits, no writes outside its folder, no
network, no subprocesses."""
from __future__ import annotations

import os
import time

from experts.tasks.sandbox import SandboxLimits, run_many, run_python

FAST = SandboxLimits(timeout_s=2.0, memory_mb=256)


def test_passing_and_failing_programs():
    assert run_python("assert sum([1, 2]) == 3\nprint('ok')").passed
    res = run_python("assert 1 == 2")
    assert res.status == "failed" and "AssertionError" in res.stderr


def test_infinite_loop_is_killed():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass", FAST)
    assert res.status == "timeout" and time.monotonic() - t0 < 10
    assert run_python("import time\ntime.sleep(60)", FAST).status == "timeout"  # not only CPU time


def test_memory_bomb_is_stopped():
    t0 = time.monotonic()
    res = run_python("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", FAST)
    assert res.status == "memory" and not res.passed and time.monotonic() - t0 < 10
    assert run_python("s = 'a' * (2**34)", FAST).status == "memory"


def test_writes_outside_its_folder_are_blocked(tmp_path):
    outside = tmp_path / "outside.txt"
    prog = f"""
import os, pathlib, shutil
open('inside.txt', 'w').write('fine')
assert open('inside.txt').read() == 'fine'
blocked = 0
for attempt in (lambda: open({str(outside)!r}, 'w'),
                lambda: pathlib.Path({str(outside)!r}).write_text('x'),
                lambda: os.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY),
                lambda: open('../escape.txt', 'a'),
                lambda: os.remove({str(tmp_path / 'keep.txt')!r}),
                lambda: shutil.rmtree({str(tmp_path)!r})):
    try:
        attempt()
    except PermissionError:
        blocked += 1
print(blocked)
assert blocked == 6
"""
    (tmp_path / "keep.txt").write_text("keep")
    res = run_python(prog, FAST)
    assert res.passed, res.stderr
    assert not outside.exists() and (tmp_path / "keep.txt").read_text() == "keep"


def test_no_network_no_processes():
    net = run_python("import socket\ns = socket.create_connection(('127.0.0.1', 80), timeout=1)", FAST)
    assert net.status == "failed" and "not allowed" in net.stderr
    proc = run_python("import subprocess\nsubprocess.run(['true'])", FAST)
    assert proc.status == "failed" and "not allowed" in proc.stderr
    assert run_python("import os\nos.system('true')", FAST).status == "failed"


def test_runs_in_a_fresh_folder_that_is_removed():
    res = run_python("import os\nprint(os.getcwd())\nprint(os.environ.get('HOME'))", FAST)
    cwd, home = res.stdout.split()
    assert cwd == home and os.path.basename(cwd).startswith("t2sandbox-") and not os.path.exists(cwd)


def test_many_in_parallel_keep_order():
    progs = [f"assert {i} % 2 == 0" for i in range(6)]
    assert [r.passed for r in run_many(progs, FAST, workers=3)] == [True, False] * 3
