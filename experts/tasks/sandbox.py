"""Run untrusted generated Python (MBPP/HumanEval solutions and their tests) isolated by the OS.

Never in the calling process, and never with the caller's view of the machine: every program runs in a
fresh ``python -I -B`` child (``sandbox_boot.py``) inside bubblewrap (``bwrap``), with
- new user, pid, network, mount, ipc, uts and cgroup namespaces: the program is uid 65534, sees only its
  own processes (the caller's, its command line and environment included, do not exist for it), has no
  network, and cannot signal anything outside;
- a read-only view of the system directories and the Python installation only (no home, no project, no
  caches, no expert store); the only writable places are two small private tmpfs (``/work``, its cwd
  and HOME, and ``/tmp``), gone with the sandbox;
- no capabilities, ``no_new_privs``, and a seccomp filter (``seccomp.py``) refusing mounts, tracing,
  other processes' memory, pidfds, new namespaces, kernel modules and keys, and io_uring;
- hard limits: address space, CPU seconds, file size (stdout/stderr too: they go to files), no core
  dumps, and processes (a fork bomb stops there): RLIMIT_NPROC, or where this process is root (whom
  RLIMIT_NPROC does not bind) a pids cgroup of its own, whose processes are all killed at the end;
- a wall-clock timeout, after which bubblewrap is killed; the pid namespace dies with it, so nothing the
  program started (``setsid`` or not) outlives the run.
Where this isolation cannot be set up (no bubblewrap, no libseccomp, user namespaces disabled, root
without a pids cgroup), nothing runs: ``run_python`` raises ``SandboxUnavailable`` saying why.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from experts.tasks.seccomp import SeccompUnavailable, filter_bytes, filter_fd

BOOT = Path(__file__).with_name("sandbox_boot.py")
_TAIL = 2000  # characters of stdout/stderr kept in a result
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_UID = 65534  # nobody, inside the sandbox's user namespace


class SandboxUnavailable(RuntimeError):
    """OS isolation cannot be set up on this machine; generated code is not run at all."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write (stdout/stderr included)
    processes: int = 16  # processes and threads of the sandbox's user at once
    tmpfs_mb: int = 64  # size of each writable tmpfs (/work and /tmp)

    @property
    def cpu_s(self) -> int:
        return int(self.timeout_s) + 1


@dataclass(frozen=True)
class RunResult:
    status: str  # passed | failed | timeout | memory | output_limit
    returncode: int | None
    stdout: str  # last characters
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _system_mounts() -> list[str]:
    """Read-only binds of the system directories and the Python installation the child runs from."""
    args: list[str] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS):
        args += ["--ro-bind", prefix, prefix]
    return args


def bwrap_command(bwrap: str, program: Path, limits: SandboxLimits, seccomp_fd: int) -> list[str]:
    """The command that runs ``program`` (a host file, bound read-only as /work/prog.py) in the sandbox."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    tmpfs = str(limits.tmpfs_mb << 20)
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(_UID), "--gid", str(_UID), "--hostname", "sandbox", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    args += _system_mounts()
    args += ["--proc", "/proc", "--dev", "/dev", "--size", tmpfs, "--tmpfs", "/tmp", "--size", tmpfs, "--tmpfs",
             "/work", "--ro-bind", str(program), "/work/prog.py", "--ro-bind", str(BOOT), "/sandbox_boot.py",
             "--remount-ro", "/", "--chdir", "/work", "--seccomp", str(seccomp_fd), "--as-pid-1"]
    python = os.path.realpath(sys.executable)
    return args + [python, "-I", "-B", "/sandbox_boot.py", str(limits.memory_mb), str(limits.cpu_s),
                   str(limits.file_mb), str(limits.processes)]


@lru_cache(maxsize=1)
def _pids_cgroup_root() -> Path | None:
    """A folder of the pids controller where this process may create cgroups (v1 hierarchy or v2), or None."""
    candidates = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mnt, fstype, opts = line.split()[:4]
        if fstype == "cgroup" and "pids" in opts.split(","):  # v1: the pids hierarchy
            candidates.append(Path(mnt))
        elif fstype == "cgroup2":  # v2: where the pids controller is enabled for children
            try:
                if "pids" in (Path(mnt) / "cgroup.subtree_control").read_text().split():
                    candidates.append(Path(mnt))
            except OSError:
                pass
    for root in candidates:
        probe = root / f"t2sandbox-probe-{os.getpid()}"
        try:
            probe.mkdir(exist_ok=True)
            (probe / "pids.max").write_text("1")
            probe.rmdir()
            return root
        except OSError:
            try:
                probe.rmdir()
            except OSError:
                pass
    return None


class _PidsCgroup:
    """A cgroup of its own for one sandbox (when this process runs as root, where RLIMIT_NPROC binds nobody):
    at most ``limit`` processes, and every process in it killed at the end."""

    def __init__(self, root: Path, limit: int):
        self.path = Path(tempfile.mkdtemp(prefix="t2sandbox-", dir=root))
        (self.path / "pids.max").write_text(str(limit))

    def wrap(self, cmd: list[str]) -> list[str]:
        # The shell joins the cgroup, then becomes bwrap: everything the sandbox starts is counted from the start.
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *cmd]

    def close(self) -> None:
        for _ in range(100):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        try:
            self.path.rmdir()
        except OSError:
            pass


@lru_cache(maxsize=1)
def isolation_problem() -> str | None:
    """Why OS isolation cannot be set up here, or None when it works (checked once, by running a probe)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    try:
        filter_bytes()
    except SeccompUnavailable as e:
        return f"no seccomp filter: {e} (apt-get install libseccomp2)"
    if os.geteuid() == 0 and _pids_cgroup_root() is None:
        return ("running as root (where RLIMIT_NPROC binds nobody) without a writable pids cgroup: the process "
                "limit cannot be enforced; run as an unprivileged user")
    res = _run(bwrap, "import os\nassert os.getuid() == 65534", SandboxLimits(timeout_s=30))
    if res.status != "passed":
        return f"bubblewrap cannot set up its namespaces here ({(res.stderr or res.status).strip()[-300:]})"
    return None


def require_isolation() -> str:
    """The bwrap executable, or ``SandboxUnavailable`` saying why generated code cannot be run here."""
    problem = isolation_problem()
    if problem is not None:
        raise SandboxUnavailable(f"refusing to run generated code without OS isolation: {problem}")
    return shutil.which("bwrap")


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - _TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _status(returncode: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == -signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr or returncode == -signal.SIGKILL:
        return "memory"
    return "failed"


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run ``source`` as a program in the sandbox; ``passed`` iff it exits 0 within the limits."""
    return _run(require_isolation(), source, limits)


def _run(bwrap: str, source: str, limits: SandboxLimits) -> RunResult:
    work = Path(tempfile.mkdtemp(prefix="t2sandbox-"))  # host side: the program and its output files
    t0 = time.monotonic()
    timed_out = False
    fd = filter_fd()
    cgroup = _PidsCgroup(_pids_cgroup_root(), limits.processes) if os.geteuid() == 0 else None
    try:
        (work / "prog.py").write_text(source, encoding="utf-8")
        cmd = bwrap_command(bwrap, work / "prog.py", limits, fd)
        if cgroup is not None:
            cmd = cgroup.wrap(cmd)
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            # No environment: nothing of this process's (keys, paths) is visible to the sandbox.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(fd,),
                                    env={}, start_new_session=True)  # its own process group: killed as a whole
            os.close(fd)
            fd = -1
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:  # bwrap and its pid namespace's init; everything else in the namespace dies with them
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        stderr = _tail(work / "stderr")
        return RunResult(_status(proc.returncode, timed_out, stderr), proc.returncode, _tail(work / "stdout"),
                         stderr, time.monotonic() - t0)
    finally:
        if fd >= 0:
            os.close(fd)
        if cgroup is not None:
            cgroup.close()
        shutil.rmtree(work, ignore_errors=True)


def run_many(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None
             ) -> list[RunResult]:
    """``run_python`` over many programs, a few at a time (threads only wait on the children)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if len(sources) <= 1 or workers == 1:
        return [run_python(s, limits) for s in sources]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_python(s, limits), sources))
