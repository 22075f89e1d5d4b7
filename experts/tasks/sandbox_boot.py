"""Runs inside the sandbox child process (``python -I -B sandbox_boot.py MEM_MB CPU_S FILE_MB``): set
the resource limits, install the audit hook, then execute ``prog.py`` from the current directory.

This file must stay standalone (standard library only): the child runs isolated (-I) and cannot
import the project. Limits are set as hard limits, so the program cannot raise them again, and the
audit hook cannot be removed once installed. The hook refuses: any write, delete, rename or mode
change outside the working directory; sockets; new processes; ctypes (which could bypass the hook).
"""
import os
import resource
import sys


def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):  # lower than the current usage, or not supported here
        pass


def _inside(root, path):
    if isinstance(path, int):  # an already open descriptor
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    real = os.path.realpath(os.fspath(path))
    return real == root or real.startswith(root + os.sep) or real == os.devnull


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATH_EVENTS = {  # event -> indices of the path arguments that must lie inside the sandbox
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "os.chflags": (0,), "os.lchmod": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
}
_DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
           "os.forkpty", "os.kill", "os.killpg", "pty.", "ctypes.", "_ctypes.")


def _install_hook(root):
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            if writes and not _inside(root, path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox is not allowed")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and args[i] is not None and not _inside(root, args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox is not allowed")
        elif event.startswith(_DENIED):
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def main():
    mem_mb, cpu_s, file_mb = (int(x) for x in sys.argv[1:4])
    _limit(resource.RLIMIT_AS, mem_mb << 20)
    _limit(resource.RLIMIT_CPU, cpu_s)
    _limit(resource.RLIMIT_FSIZE, file_mb << 20)
    _limit(resource.RLIMIT_CORE, 0)
    with open("prog.py", encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "prog.py", "exec")
    _install_hook(os.path.realpath(os.getcwd()))
    sys.argv = ["prog.py"]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
