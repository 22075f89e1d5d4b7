"""Runs inside the sandbox (``python -I -B /sandbox_boot.py MEM_MB CPU_S FILE_MB PROCS FILES``, under bubblewrap):
set the resource limits, then execute ``prog.py`` from the current directory.

This file must stay standalone (standard library only): the child runs isolated (-I) and cannot see the
project. Limits are set as hard limits, so the program cannot raise them again. Isolation itself (what
the program can see, write and signal) is the namespaces' and the seccomp filter's job, not this file's.
"""
import os
import resource


def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):  # lower than the current usage, or not supported here
        pass


def main():
    import sys

    mem_mb, cpu_s, file_mb, procs, files = (int(x) for x in sys.argv[1:6])
    _limit(resource.RLIMIT_AS, mem_mb << 20)
    _limit(resource.RLIMIT_CPU, cpu_s)
    _limit(resource.RLIMIT_FSIZE, file_mb << 20)
    if procs:  # 0: processes are limited by a pids cgroup instead
        _limit(resource.RLIMIT_NPROC, procs)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NOFILE, files)
    with open("prog.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "prog.py", "exec")
    sys.argv = ["prog.py"]
    os.environ.pop("PYTHONSTARTUP", None)
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
