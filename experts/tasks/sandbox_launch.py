"""Starts the sandbox (``python -I -S -B sandbox_launch.py SPEC BWRAP ARGS...``): the last step that runs with
the caller's privileges, then becomes bubblewrap.

SPEC is JSON: ``{"cgroups": [folders], "uid": n or null, "binds": [[source, mountpoint], ...]}``. In order:
1. join each cgroup (writing its own pid to ``cgroup.procs``), so that bubblewrap and everything the program
   starts are counted and limited from their first instruction;
2. where ``binds`` are given (running as root), make a private mount namespace and bind each source (a
   folder the unprivileged uid may not be able to traverse, such as a Python under ``/root``) onto an empty
   world-traversable mountpoint; these mounts exist only for this process and its children;
3. where ``uid`` is given, drop to that unprivileged host uid and gid (no supplementary groups, no
   capabilities left), so that bubblewrap's user namespace maps the program to it and never to host root;
4. exec bubblewrap.
Any failure exits 126 with the reason on stderr; nothing runs. Standard library only (it runs isolated).
"""
import ctypes
import json
import os
import sys

_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000


def _fail(what, err=None):
    sys.stderr.write(f"sandbox launcher: {what}{f': {os.strerror(err)}' if err else ''}\n")
    sys.exit(126)


def _private_binds(binds):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.unshare(_CLONE_NEWNS) != 0:
        _fail("unshare(CLONE_NEWNS)", ctypes.get_errno())
    # Nothing mounted below propagates back to the host's mount namespace.
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        _fail("making / private", ctypes.get_errno())
    for source, target in binds:
        src, dst = os.fsencode(source), os.fsencode(target)
        if libc.mount(src, dst, None, _MS_BIND | _MS_REC, None) != 0:
            _fail(f"bind {source} on {target}", ctypes.get_errno())
        if libc.mount(None, dst, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None) != 0:
            _fail(f"read-only {target}", ctypes.get_errno())


def main():
    spec = json.loads(sys.argv[1])
    cmd = sys.argv[2:]
    for folder in spec.get("cgroups", ()):
        try:
            with open(os.path.join(folder, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            _fail(f"joining cgroup {folder}", e.errno)
    if spec.get("binds"):
        _private_binds(spec["binds"])
    uid = spec.get("uid")
    if uid is not None:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        except OSError as e:
            _fail(f"dropping to uid {uid}", e.errno)
        if os.getuid() != uid or os.geteuid() != uid:
            _fail(f"still uid {os.geteuid()} after dropping to uid {uid}")
    try:
        os.execv(cmd[0], cmd)
    except OSError as e:
        _fail(f"exec {cmd[0]}", e.errno)


if __name__ == "__main__":
    main()
