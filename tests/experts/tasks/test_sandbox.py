"""The code sandbox: OS isolation (namespaces, read-only system, private tmpfs, seccomp, limits), checked by
programs that try to escape it the ways plain standard-library Python can, and the ordinary limits
(time, memory, output). Each escape test states what the program tries and checks the host afterwards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from experts.tasks import sandbox
from experts.tasks.sandbox import SandboxLimits, SandboxUnavailable, run_many, run_python

FAST = SandboxLimits(timeout_s=3.0, memory_mb=256)


@pytest.mark.usefixtures("isolation")
def test_passing_and_failing_programs():
    assert run_python("assert sum([1, 2]) == 3\nprint('ok')").passed
    res = run_python("assert 1 == 2")
    assert res.status == "failed" and "AssertionError" in res.stderr


@pytest.mark.usefixtures("isolation")
def test_infinite_loop_is_killed():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass", FAST)
    assert res.status == "timeout" and time.monotonic() - t0 < 10
    assert run_python("import time\ntime.sleep(60)", FAST).status == "timeout"  # not only CPU time


@pytest.mark.usefixtures("isolation")
def test_memory_bomb_is_stopped():
    t0 = time.monotonic()
    res = run_python("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", FAST)
    assert res.status == "memory" and not res.passed and time.monotonic() - t0 < 10
    assert run_python("s = 'a' * (2**34)", FAST).status == "memory"


@pytest.mark.usefixtures("isolation")
def test_runs_as_nobody_in_a_private_work_folder():
    res = run_python("import os\nopen('inside.txt', 'w').write('fine')\nprint(os.getuid(), os.getcwd(), "
                     "os.environ['HOME'], open('inside.txt').read())", FAST)
    assert res.stdout.split() == ["65534", "/work", "/work", "fine"], res.stderr


@pytest.mark.usefixtures("isolation")
def test_many_in_parallel_keep_order():
    progs = [f"assert {i} % 2 == 0" for i in range(6)]
    assert [r.passed for r in run_many(progs, FAST, workers=3)] == [True, False] * 3


# --- escapes ------------------------------------------------------------------------------------------

def _run_escape(prog: str, limits: SandboxLimits = FAST) -> sandbox.RunResult:
    res = run_python(prog, limits)
    assert res.status in ("passed", "failed", "timeout"), (res.status, res.stderr)
    return res


@pytest.mark.usefixtures("isolation")
def test_writes_outside_through_paths_and_dir_fd_never_reach_the_host(tmp_path):
    """Plain paths, ``dir_fd=`` relative writes and deletes, renames and ``..``: the host folder is not even
    there, and what is there (the system) is read-only."""
    (tmp_path / "keep.txt").write_text("keep")
    prog = f"""
import os, shutil
done = []
def attempt(name, f):
    try:
        f()
        done.append(name)
    except OSError:
        pass
attempt("open", lambda: open({str(tmp_path / 'outside.txt')!r}, "w").write("x"))
attempt("remove", lambda: os.remove({str(tmp_path / 'keep.txt')!r}))
attempt("rmtree", lambda: shutil.rmtree({str(tmp_path)!r}))
for d in ("/", "/usr", "/usr/lib", "/tmp/..", {str(tmp_path)!r}):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        continue
    attempt("dir_fd write " + d, lambda: os.close(os.open("escape.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd)))
    attempt("dir_fd mkdir " + d, lambda: os.mkdir("escape-dir", dir_fd=fd))
attempt("parent", lambda: open("../escape.txt", "a").write("x"))
attempt("usr", lambda: open("/usr/escape.txt", "w").write("x"))
print(done)
"""
    res = _run_escape(prog)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "keep"
    assert not Path("/usr/escape.txt").exists() and not Path("/usr/lib/escape.txt").exists()


@pytest.mark.usefixtures("isolation")
def test_writes_by_c_code_never_reach_the_host(tmp_path):
    """sqlite3 writes its file in C, below any Python-level hook."""
    db = tmp_path / "escape.db"
    res = _run_escape(f"import sqlite3\nsqlite3.connect({str(db)!r}).execute('create table t(x)')")
    assert res.status == "failed" and "sqlite3" in res.stderr
    assert not db.exists()


@pytest.mark.usefixtures("isolation")
def test_binaries_started_with_fork_exec_stay_inside(tmp_path):
    """``_posixsubprocess.fork_exec`` runs a shell: it runs as nobody, inside the sandbox, and what it writes
    outside its tmpfs goes nowhere."""
    marker = tmp_path / "marker"
    prog = f"""
import _posixsubprocess, os
r, w = os.pipe()
args = [b"/bin/sh", b"-c", b"id -u; touch {marker} 2>/dev/null || echo refused"]
pid = _posixsubprocess.fork_exec(args, [b"/bin/sh"], True, (), None, None, -1, -1, -1, w, -1, -1, -1, -1, -1, -1,
                                 -1, False, False, -1, None, None, None, -1, None, False)
os.close(w)
os.waitpid(pid, 0)
"""
    res = _run_escape(prog)
    if res.status == "failed" and "TypeError" in res.stderr:  # fork_exec's signature differs on this Python
        res = _run_escape("import subprocess\nprint(subprocess.run(['/bin/sh', '-c', "
                          f"'id -u; touch {marker} 2>/dev/null || echo refused'], capture_output=True, text=True).stdout)")
    assert "65534" in res.stdout and "refused" in res.stdout, res.stdout + res.stderr
    assert not marker.exists()


def _host_processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.mark.usefixtures("isolation")
def test_a_setsid_survivor_dies_with_the_sandbox():
    """A child in a new session (``setsid``) that ignores SIGHUP, left running when the program times out,
    is gone once ``run_python`` returns: it lived in the sandbox's pid namespace."""
    marker = "4242.123456"
    prog = f"""
import os, subprocess, time
subprocess.Popen(["/bin/sh", "-c", "trap '' HUP; exec sleep {marker}"], start_new_session=True)
time.sleep(60)
"""
    res = run_python(prog, SandboxLimits(timeout_s=2.0))
    assert res.status == "timeout"
    deadline = time.monotonic() + 5
    while _host_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _host_processes_with(marker) == []


@pytest.mark.usefixtures("isolation")
def test_the_caller_cannot_be_signalled_or_seen():
    """``kill``, ``pidfd_open``/``pidfd_send_signal`` against the calling process, and reading its command
    line and environment under /proc: the caller does not exist in the sandbox's pid namespace."""
    received = []
    old = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    os.environ["T2_SANDBOX_SECRET"] = "admin-key-that-must-not-leak"
    try:
        me = os.getpid()
        prog = f"""
import os, signal
for attempt in (lambda: os.kill({me}, signal.SIGUSR1), lambda: os.kill(os.getppid(), signal.SIGUSR1),
                lambda: signal.pidfd_send_signal(os.pidfd_open({me}), signal.SIGUSR1)):
    try:
        attempt()
        print("signalled")
    except OSError as e:
        print("refused", type(e).__name__)
seen = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for f in ("cmdline", "environ"):
            try:
                seen.append(open(f"/proc/{{pid}}/{{f}}", "rb").read().decode(errors="replace"))
            except OSError:
                pass
print("\\n".join(seen))
print("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
"""
        res = _run_escape(prog)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, old)
        del os.environ["T2_SANDBOX_SECRET"]
    assert received == []
    assert res.stdout.count("refused") >= 2 and "admin-key-that-must-not-leak" not in res.stdout
    assert "pytest" not in res.stdout and str(sys.executable) not in res.stdout.replace("/sandbox_boot.py", "")
    pids = eval(res.stdout.rsplit("pids", 1)[1])
    assert max(pids) < 100  # only the sandbox's own few processes


@pytest.mark.usefixtures("isolation")
def test_a_fork_bomb_is_contained():
    """A shell fork bomb hits the process limit, is killed at the timeout, and leaves no process behind."""
    marker = "t2forkbomb"
    prog = f"""
import subprocess
subprocess.run(["/bin/sh", "-c", "{marker}() {{ {marker} | {marker} & }}; {marker}; sleep 30"])
"""
    before = len(os.listdir("/proc"))
    t0 = time.monotonic()
    res = run_python(prog, SandboxLimits(timeout_s=3.0, processes=16))
    assert res.status in ("timeout", "failed", "passed") and time.monotonic() - t0 < 15
    time.sleep(0.5)
    assert _host_processes_with(marker) == []
    assert len(os.listdir("/proc")) < before + 20


@pytest.mark.usefixtures("isolation")
def test_no_network():
    res = _run_escape("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n"
                      "    print('connected')\nexcept OSError as e:\n    print('refused', e)")
    assert "refused" in res.stdout and "connected" not in res.stdout


@pytest.mark.usefixtures("isolation")
def test_the_seccomp_filter_refuses_namespace_and_trace_calls():
    prog = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
print("unshare", libc.unshare(CLONE_NEWNS), ctypes.get_errno())
print("ptrace", libc.ptrace(16, 1, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH to the namespace's init
"""
    res = _run_escape(prog)
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert lines["unshare"].split() == ["-1", "1"] and lines["ptrace"].split() == ["-1", "1"], res.stdout


def test_no_isolation_means_no_run(monkeypatch):
    """Where bubblewrap is missing, nothing runs: a clear error instead."""
    sandbox.isolation_problem.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        with pytest.raises(SandboxUnavailable, match="bubblewrap is not installed"):
            run_python("print('never runs')")
    finally:
        sandbox.isolation_problem.cache_clear()


def test_the_probe_reports_a_broken_bubblewrap(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    sandbox.isolation_problem.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: str(fake))
    try:
        with pytest.raises(SandboxUnavailable, match="cannot set up its namespaces"):
            run_python("print('never runs')")
    finally:
        sandbox.isolation_problem.cache_clear()
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


# --- as root: kernel settings and the host uid ---------------------------------------------------------

def _host_uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    return []


@pytest.mark.usefixtures("isolation")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: as an unprivileged user the sandbox's uid maps to that "
                    "user, never to host root")
def test_as_root_the_program_is_an_unprivileged_host_uid_and_cannot_change_kernel_settings():
    """Called by root, the program opens ``kernel.core_pattern`` for writing and writes ``vm.swappiness``:
    both refused, the host's values unchanged; a process it starts runs as an unprivileged host uid."""
    swappiness = Path("/proc/sys/vm/swappiness")
    before = swappiness.read_text(), Path("/proc/sys/kernel/core_pattern").read_text()
    other = "1" if before[0].strip() != "1" else "2"
    marker = "4242.31337"
    prog = f"""
import os, subprocess, time
for path, value in (("/proc/sys/kernel/core_pattern", None), ("/proc/sys/vm/swappiness", {other!r})):
    try:
        with open(path, "w") as f:
            if value:
                f.write(value)
        print("changed", path)
    except OSError as e:
        print("refused", path, e.errno)
child = subprocess.Popen(["sleep", "{marker}"])
time.sleep(1.5)
child.kill()
"""
    seen: list[list[int]] = []
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_python, prog, SandboxLimits(timeout_s=8.0))
        deadline = time.monotonic() + 6
        while not seen and time.monotonic() < deadline:
            seen = [_host_uids(pid) for pid in _host_processes_with(marker)]
            time.sleep(0.05)
        res = future.result()
    try:
        assert (swappiness.read_text(), Path("/proc/sys/kernel/core_pattern").read_text()) == before
    finally:  # only were the test to fail: put the machine back
        if swappiness.read_text() != before[0]:
            swappiness.write_text(before[0])
    assert res.stdout.count("refused") == 2 and "changed" not in res.stdout, res.stdout + res.stderr
    assert seen and all(uids and 0 not in uids for uids in seen), seen
    assert all(uids == [sandbox._HOST_UID] * 4 for uids in seen), seen


# --- memory for the whole run --------------------------------------------------------------------------

def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no MemAvailable")


def _run_watching_host_memory(prog: str, limits: SandboxLimits) -> tuple[sandbox.RunResult, int]:
    """The result, and how far the host's available memory fell below its level before the run, at worst."""
    before = _mem_available()
    lowest = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], _mem_available())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = run_python(prog, limits)
    finally:
        done.set()
        watcher.join()
    return res, before - lowest[0]


@pytest.mark.usefixtures("isolation")
def test_writing_3_gb_to_dev_shm_and_every_writable_folder_is_refused():
    """3 GB written in file-size-limit pieces to /dev/shm, /dev, /tmp and /work: each stops at its tmpfs size
    (/dev is read-only), and the host's available memory does not fall by anything like 3 GB."""
    limits = SandboxLimits(timeout_s=8.0, memory_mb=256)
    prog = """
total = {}
for d in ("/dev/shm", "/dev", "/tmp", "/work"):
    total[d] = 0
    try:
        i = 0
        while total[d] < 3 << 30:
            with open(f"{d}/fill{i}", "wb") as f:
                for _ in range(16):
                    f.write(b"x" * (1 << 20))
                    total[d] += 1 << 20
            i += 1
    except OSError:
        pass
print({d: n >> 20 for d, n in total.items()})
"""
    res, fell = _run_watching_host_memory(prog, limits)
    assert res.passed, res.stderr
    written = eval(res.stdout)
    assert written["/dev"] == 0 and all(written[d] <= limits.tmpfs_mb for d in ("/dev/shm", "/tmp", "/work")), written
    assert fell < 1 << 30, fell >> 20


def _memory_cgroup_here() -> None:
    if "memory" not in sandbox._cgroup_roots():
        pytest.skip("no writable memory cgroup here (as an unprivileged user without a delegated one, memory is "
                    "capped per process only)")


@pytest.mark.usefixtures("isolation")
def test_memfds_beyond_the_memory_budget_are_stopped():
    """memfds of 16 MB (each within the file-size limit) up to 1 GB against a 256 MB budget: the run is killed
    for memory before holding it, and the host does not give it."""
    _memory_cgroup_here()
    prog = """
import os
fds = []
for i in range(64):
    fd = os.memfd_create(f"m{i}")
    for _ in range(16):
        os.write(fd, b"y" * (1 << 20))
    fds.append(fd)
print("held", len(fds) * 16, "MB")
"""
    res, fell = _run_watching_host_memory(prog, SandboxLimits(timeout_s=8.0, memory_mb=256))
    assert res.status == "memory" and "held" not in res.stdout, (res.status, res.stdout, res.stderr)
    assert fell < 768 << 20, fell >> 20


@pytest.mark.usefixtures("isolation")
def test_forked_children_share_one_memory_budget():
    """Four children of 200 MB each (every one within its own 256 MB address space) against a 256 MB budget for
    the run: they are not all held at once, the kernel kills some."""
    _memory_cgroup_here()
    prog = """
import os, signal, time
r, w = os.pipe()
pids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        x = bytearray(200 << 20)
        for j in range(0, len(x), 4096):
            x[j] = 1
        os.write(w, b"k")
        time.sleep(2)
        os._exit(0)
    pids.append(pid)
os.close(w)
held = 0
while os.read(r, 1):
    held += 1
killed = sum(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL for s in (os.waitpid(p, 0)[1] for p in pids))
print("held", held, "killed", killed)
"""
    res, fell = _run_watching_host_memory(prog, SandboxLimits(timeout_s=8.0, memory_mb=256, processes=16))
    if res.status == "passed":
        held, killed = int(res.stdout.split()[1]), int(res.stdout.split()[3])
        assert held < 4 and killed >= 1, res.stdout
    else:  # the parent itself was chosen
        assert res.status == "memory", (res.status, res.stdout, res.stderr)
    assert fell < 768 << 20, fell >> 20


# --- cgroups are removed -------------------------------------------------------------------------------

@pytest.mark.usefixtures("isolation")
def test_no_cgroup_is_left_after_timeouts(monkeypatch):
    """Fork bombs and a sleeper killed at their timeout, three at a time: every cgroup they ran in is gone."""
    if not sandbox._cgroup_roots():
        pytest.skip("no writable cgroup here: runs are limited by rlimits only")
    created: list[Path] = []

    class Recorded(sandbox._Cgroups):
        def __init__(self, *args):
            super().__init__(*args)
            created.extend(self.paths)

    monkeypatch.setattr(sandbox, "_Cgroups", Recorded)
    bomb = 'import subprocess\nsubprocess.run(["/bin/sh", "-c", "b() { b | b & }; b; sleep 30"])'
    sleeper = "import subprocess, time\nsubprocess.Popen(['sleep', '30'], start_new_session=True)\ntime.sleep(30)"
    results = run_many([bomb, sleeper, bomb], SandboxLimits(timeout_s=1.5), workers=3)
    assert results[1].status == "timeout"  # a bomb may also end early, when its shell cannot fork the sleep
    assert len(created) == 3 * len(set(sandbox._cgroup_roots().values()))
    assert [p for p in created if p.exists()] == []


def test_a_cgroup_busy_for_a_while_is_still_removed(monkeypatch, tmp_path):
    """A cgroup that cannot be removed at first (members still exiting on a loaded machine) is retried until it
    goes, and one still busy at the deadline is removed by a later run."""
    folder = tmp_path / "t2sandbox-busy"
    folder.mkdir()
    busy = {"left": 5}
    real_rmdir = Path.rmdir

    def rmdir(self):
        if self == folder and busy["left"] > 0:
            busy["left"] -= 1
            raise OSError(16, "Device or resource busy")
        real_rmdir(self)

    monkeypatch.setattr(Path, "rmdir", rmdir)
    cgroups = sandbox._Cgroups({}, SandboxLimits())
    cgroups.paths = [folder]
    cgroups.close()
    assert not folder.exists()

    folder.mkdir()
    busy["left"] = 10 ** 6
    cgroups.close(deadline_s=0.1)
    assert folder.exists() and folder in sandbox._LEFTOVER
    busy["left"] = 0
    sandbox._Cgroups({}, SandboxLimits()).close()
    assert not folder.exists() and folder not in sandbox._LEFTOVER
