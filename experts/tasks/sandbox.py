"""Run untrusted generated Python (MBPP/HumanEval solutions and their tests) isolated by the OS.

Never in the calling process, and never with the caller's view of the machine: every program runs in a
fresh ``python -I -B`` child (``sandbox_boot.py``) inside bubblewrap (``bwrap``), started by a small
launcher (``sandbox_launch.py``), with
- never host root: called by root, the launcher drops to the unprivileged host uid 65534 before bubblewrap
  starts (bubblewrap's user namespace then maps the program to it), after binding the Python installation
  onto a mountpoint that uid can reach in a private mount namespace (a Python under ``/root`` works);
  called by another user, the program is that user on the host. ``/proc/sys`` is read-only on top of that,
  ``/sys`` is not mounted, so kernel settings are out of reach;
- new user, pid, network, mount, ipc, uts and cgroup namespaces: the program is uid 65534, sees only its
  own processes (the caller's, its command line and environment included, do not exist for it), has no
  network, and cannot signal anything outside;
- a read-only view of the system directories and the Python installation only (no home, no project, no
  caches, no expert store; the program and ``sandbox_boot.py`` are copied in from descriptors); the only
  writable places are three sized private tmpfs (``/work``, its cwd and HOME, ``/tmp`` and ``/dev/shm``;
  ``/dev`` itself is read-only), gone with the sandbox;
- no capabilities, ``no_new_privs``, and a seccomp filter (``seccomp.py``) refusing mounts, tracing,
  other processes' memory, pidfds, new namespaces, kernel modules and keys, and io_uring;
- memory capped for the whole run: a memory cgroup of its own (v1 ``memory.limit_in_bytes`` and no swap,
  or v2 ``memory.max``, ``memory.swap.max`` 0 and ``memory.oom.group``) counts every process, tmpfs and
  ``/dev/shm`` file, memfd and page of the run against ``memory_mb``; the kernel kills the run beyond it;
- hard limits per process: address space, CPU seconds, file size (stdout/stderr too: they go to files),
  open files (which bound memfds and socket buffers held), no core dumps, and processes (a fork bomb stops
  there): RLIMIT_NPROC and a pids cgroup of its own where one can be made; called by root, the pids
  cgroup only (always there; every such sandbox is host uid 65534, whose RLIMIT_NPROC count they share);
- a wall-clock timeout, after which bubblewrap is killed; the pid namespace dies with it, so nothing the
  program started (``setsid`` or not) outlives the run; every process left in its cgroups is killed and
  the cgroups removed (retried while members are still exiting).
Where this isolation cannot be set up (no bubblewrap, no libseccomp, user namespaces disabled for uid 65534,
root without writable pids and memory cgroups, kernel settings still writable to the probe), nothing runs:
``run_python`` raises ``SandboxUnavailable`` saying why. Limit: called by an unprivileged user without a
delegated memory cgroup, memory is capped per process (address space, tmpfs sizes), not for the whole run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from experts.tasks.seccomp import SeccompUnavailable, filter_bytes, filter_fd

BOOT = Path(__file__).with_name("sandbox_boot.py")
LAUNCH = Path(__file__).with_name("sandbox_launch.py")
_TAIL = 2000  # characters of stdout/stderr kept in a result
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_UID = 65534  # nobody, inside the sandbox's user namespace
_HOST_UID = 65534  # the unprivileged host uid the sandbox runs as when the caller is root (nobody)
_CONTROLLERS = ("pids", "memory")


class SandboxUnavailable(RuntimeError):
    """OS isolation cannot be set up on this machine; generated code is not run at all."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # the whole run's memory (memory cgroup), and each process's address space
    file_mb: int = 16  # largest file the program may write (stdout/stderr included)
    processes: int = 16  # processes and threads of the sandbox's user at once
    tmpfs_mb: int = 64  # size of each writable tmpfs (/work, /tmp and /dev/shm)
    open_files: int = 256  # descriptors per process (bounds memfds and socket buffers held at once)

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


def _python_prefix() -> str | None:
    """The Python installation the child runs from, where it lies outside the system directories."""
    prefix = os.path.realpath(sys.base_prefix)
    return None if any(prefix == d or prefix.startswith(d + "/") for d in _SYSTEM_DIRS) else prefix


def _system_mounts(python_source: str | None) -> list[str]:
    """Read-only binds of the system directories and the Python installation (bound from ``python_source``,
    a mountpoint the launcher filled, when the installation itself may not be reachable for the sandbox's uid)."""
    args: list[str] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    prefix = _python_prefix()
    if prefix is not None:
        args += ["--ro-bind", python_source or prefix, prefix]
    return args


def bwrap_command(bwrap: str, limits: SandboxLimits, fds: dict[str, int], python_source: str | None = None
                  ) -> list[str]:
    """The command that runs the program in the sandbox: ``fds`` are readable descriptors of the program
    (``prog``), ``sandbox_boot.py`` (``boot``) and the seccomp filter (``seccomp``); their contents are copied
    into the sandbox read-only, so no host path of the caller needs to be reachable for the sandbox's uid."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    tmpfs = str(limits.tmpfs_mb << 20)
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--uid", str(_UID), "--gid", str(_UID), "--hostname", "sandbox", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    args += _system_mounts(python_source)
    # /proc/sys and /proc/sysrq-trigger read-only on top of the unprivileged uid (kernel settings are
    # machine-wide); /sys is not mounted at all. /dev is read-only but for a sized /dev/shm.
    args += ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys"]
    if os.path.exists("/proc/sysrq-trigger"):
        args += ["--ro-bind", "/proc/sysrq-trigger", "/proc/sysrq-trigger"]
    args += ["--dev", "/dev", "--size", tmpfs, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--size", tmpfs, "--tmpfs", "/tmp", "--size", tmpfs, "--tmpfs", "/work",
             "--ro-bind-data", str(fds["prog"]), "/work/prog.py", "--ro-bind-data", str(fds["boot"]),
             "/sandbox_boot.py", "--remount-ro", "/", "--chdir", "/work", "--seccomp", str(fds["seccomp"]),
             "--as-pid-1"]
    python = os.path.realpath(sys.executable)
    # Called by root, every sandbox is host uid 65534, whose process count older kernels share across
    # sandboxes: the pids cgroup (always there for root) limits processes instead of RLIMIT_NPROC (0: unset).
    nproc = 0 if os.geteuid() == 0 else limits.processes
    return args + [python, "-I", "-B", "/sandbox_boot.py", str(limits.memory_mb), str(limits.cpu_s),
                   str(limits.file_mb), str(nproc), str(limits.open_files)]


def _limit_file(controller: str, v2: bool) -> str:
    return {"pids": "pids.max", "memory": "memory.max" if v2 else "memory.limit_in_bytes"}[controller]


def _cgroup_candidates(controller: str) -> list[tuple[Path, bool]]:
    """Folders that may take child cgroups limited by ``controller``: its v1 hierarchy, or v2 folders (the
    mount and the ancestors of this process's own cgroup, nearest first) that enable it for their children."""
    own = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = line[3:].strip("/")
    except OSError:
        pass
    found: list[tuple[Path, bool]] = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mnt, fstype, opts = line.split()[:4]
        if fstype == "cgroup" and controller in opts.split(","):
            found.append((Path(mnt), False))
        elif fstype == "cgroup2":
            parts = own.split("/") if own else []
            for depth in range(max(len(parts) - 1, 0), -1, -1):  # our cgroup's parent, ..., the mount itself
                folder = Path(mnt, *parts[:depth])
                try:
                    if controller in (folder / "cgroup.subtree_control").read_text().split():
                        found.append((folder, True))
                except OSError:
                    pass
    return found


@lru_cache(maxsize=1)
def _cgroup_roots() -> dict[str, tuple[Path, bool]]:
    """For each of the pids and memory controllers, a folder where this process may create cgroups limited
    by it, and whether it is cgroup v2; a controller is missing where none is writable."""
    roots = {}
    for controller in _CONTROLLERS:
        for root, v2 in _cgroup_candidates(controller):
            probe = root / f"t2sandbox-probe-{os.getpid()}"
            try:
                probe.mkdir(exist_ok=True)
                (probe / _limit_file(controller, v2)).write_text("1" if controller == "pids" else str(64 << 20))
                roots[controller] = (root, v2)
            except OSError:
                pass
            try:
                probe.rmdir()
            except OSError:
                pass
            if controller in roots:
                break
    return roots


_LEFTOVER: set[Path] = set()  # cgroups whose removal timed out, retried by every later close
_LEFTOVER_LOCK = threading.Lock()  # run_many closes from several threads


class _Cgroups:
    """The cgroups of one sandbox (one per hierarchy): at most ``processes`` processes and ``memory_mb`` of
    memory for everything the run holds at once (processes, tmpfs and /dev/shm files, memfds, page cache and,
    on v2, kernel memory), no swap; every process in them killed and the folders removed at the end."""

    def __init__(self, roots: dict[str, tuple[Path, bool]], limits: SandboxLimits):
        self.paths: list[Path] = []
        self.memory: tuple[Path, bool] | None = None
        by_root: dict[tuple[Path, bool], list[str]] = {}
        for controller, root in roots.items():
            by_root.setdefault(root, []).append(controller)
        mem = str(limits.memory_mb << 20)
        try:
            for (root, v2), controllers in by_root.items():
                path = Path(tempfile.mkdtemp(prefix="t2sandbox-", dir=root))
                self.paths.append(path)
                if "pids" in controllers:
                    (path / "pids.max").write_text(str(limits.processes))
                if "memory" in controllers:
                    (path / _limit_file("memory", v2)).write_text(mem)
                    self.memory = (path, v2)
                    # Optional: no swap, one OOM kill ends the whole run (v2), TCP buffers bounded too (v1).
                    for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")) if v2 else (
                            ("memory.memsw.limit_in_bytes", mem), ("memory.kmem.tcp.limit_in_bytes", mem)):
                        try:
                            (path / name).write_text(value)
                        except OSError:
                            pass
        except BaseException:
            self.close()
            raise

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the run for exceeding the memory limit."""
        if self.memory is None:
            return False
        path, v2 = self.memory
        try:
            text = (path / ("memory.events" if v2 else "memory.oom_control")).read_text()
        except OSError:
            return False
        counts = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2)
        return int(counts.get("oom_kill", "0")) > 0

    def close(self, deadline_s: float = 10.0) -> None:
        # Processes can take a while to exit on a loaded machine, and a cgroup with dying members cannot be
        # removed yet: kill and retry until every folder is gone; what still stays is retried by later runs.
        with _LEFTOVER_LOCK:
            pending = [*self.paths, *_LEFTOVER]
        end = time.monotonic() + deadline_s
        while pending:
            for path in list(pending):
                if (path / "cgroup.kill").exists():
                    try:
                        (path / "cgroup.kill").write_text("1")
                    except OSError:
                        pass
                try:
                    pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
                except OSError:
                    pids = []
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
                pending.remove(path)
                with _LEFTOVER_LOCK:
                    _LEFTOVER.discard(path)
            if not pending or time.monotonic() > end:
                break
            time.sleep(0.02)
        with _LEFTOVER_LOCK:
            _LEFTOVER.update(pending)


@lru_cache(maxsize=1)
def isolation_problem() -> str | None:
    """Why OS isolation cannot be set up here, or None when it works (checked once, by running a probe that
    must find itself at the unprivileged uid with kernel settings out of reach)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    try:
        filter_bytes()
    except SeccompUnavailable as e:
        return f"no seccomp filter: {e} (apt-get install libseccomp2)"
    if os.geteuid() == 0:
        missing = [c for c in _CONTROLLERS if c not in _cgroup_roots()]
        if missing:
            return (f"running as root without a writable {' or '.join(missing)} cgroup (v1 hierarchy, or v2 with "
                    "the controller enabled for children): the process and memory limits cannot be enforced; "
                    "run as an unprivileged user")
    # Kernel settings are checked by the host uid (global root or not) and our read-only mounts: neither may
    # let the program open one for writing (opening writes nothing).
    probe = ("import os\nassert os.getuid() == 65534, os.getuid()\n"
             "try:\n    os.close(os.open('/proc/sys/kernel/core_pattern', os.O_WRONLY))\nexcept OSError:\n    pass\n"
             "else:\n    raise SystemExit('kernel settings are writable')\n")
    res = _run(bwrap, probe, SandboxLimits(timeout_s=30))
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


def _status(returncode: int | None, timed_out: bool, stderr: str, oom_killed: bool = False) -> str:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if returncode == -signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if oom_killed or "MemoryError" in stderr or returncode == -signal.SIGKILL:
        return "memory"
    return "failed"


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run ``source`` as a program in the sandbox; ``passed`` iff it exits 0 within the limits."""
    return _run(require_isolation(), source, limits)


def _launch_command(bwrap: str, limits: SandboxLimits, fds: dict[str, int], cgroups: _Cgroups | None,
                    mountpoint: Path | None) -> list[str]:
    """bwrap's command behind the launcher, which joins the cgroups and, as root, drops to ``_HOST_UID`` after
    binding the Python installation onto ``mountpoint`` (empty, world-traversable; the bind is private)."""
    spec: dict = {"cgroups": [str(p) for p in cgroups.paths] if cgroups else [], "uid": None, "binds": []}
    if os.geteuid() == 0:
        spec["uid"] = _HOST_UID
    if mountpoint is not None:
        spec["binds"] = [[_python_prefix(), str(mountpoint)]]
    launcher = [os.path.realpath(sys.executable), "-I", "-S", "-B", str(LAUNCH), json.dumps(spec)]
    return launcher + bwrap_command(bwrap, limits, fds, str(mountpoint) if mountpoint else None)


def _run(bwrap: str, source: str, limits: SandboxLimits) -> RunResult:
    work = Path(tempfile.mkdtemp(prefix="t2sandbox-"))  # host side: the program and its output files
    t0 = time.monotonic()
    timed_out = False
    fds: dict[str, int] = {}
    cgroups = mountpoint = None
    try:
        if os.geteuid() == 0 and _python_prefix() is not None:
            # Under /tmp, not $TMPDIR: every part of its path must be traversable for the unprivileged uid.
            mountpoint = Path(tempfile.mkdtemp(prefix="t2sandbox-python-", dir="/tmp"))
            mountpoint.chmod(0o755)
        roots = _cgroup_roots()  # as root, isolation_problem has made sure both controllers are there
        cgroups = _Cgroups(roots, limits) if roots else None
        prog = work / "prog.py"
        with open(os.open(prog, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            f.write(source)
        fds["seccomp"] = filter_fd()
        fds["prog"] = os.open(prog, os.O_RDONLY)
        fds["boot"] = os.open(BOOT, os.O_RDONLY)
        cmd = _launch_command(bwrap, limits, fds, cgroups, mountpoint)
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            # No environment: nothing of this process's (keys, paths) is visible to the sandbox.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=tuple(fds.values()),
                                    env={}, cwd="/", start_new_session=True)  # its own process group: killed as a whole
            for fd in fds.values():
                os.close(fd)
            fds = {}
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
        oom = cgroups is not None and cgroups.oom_killed()
        return RunResult(_status(proc.returncode, timed_out, stderr, oom), proc.returncode, _tail(work / "stdout"),
                         stderr, time.monotonic() - t0)
    finally:
        for fd in fds.values():
            os.close(fd)
        if cgroups is not None:
            cgroups.close()
        if mountpoint is not None:
            try:
                mountpoint.rmdir()  # empty here: the bind exists only in the launcher's mount namespace
            except OSError:
                pass
        shutil.rmtree(work, ignore_errors=True)


def run_many(sources: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None
             ) -> list[RunResult]:
    """``run_python`` over many programs, a few at a time (threads only wait on the children)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    if len(sources) <= 1 or workers == 1:
        return [run_python(s, limits) for s in sources]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_python(s, limits), sources))
