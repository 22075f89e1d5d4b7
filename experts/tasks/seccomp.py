"""The sandbox's seccomp filter: a classic BPF program that lets every system call through except those that
reach beyond a process's own namespaces or attack the kernel (mounting, tracing, other processes'
memory, kernel modules and keys, io_uring, which bypasses seccomp, new namespaces). Refused calls fail
with EPERM. Built with the system's libseccomp (``libseccomp.so.2``, resolved for this machine's
architecture) and handed to bubblewrap as a file descriptor (``bwrap --seccomp FD``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
from functools import lru_cache

DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    "unshare", "setns",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "settimeofday", "clock_settime", "adjtimex",
    "iopl", "ioperm", "vhangup", "lookup_dcookie", "fanotify_init",
)
_ALLOW = 0x7FFF0000  # SCMP_ACT_ALLOW
_ERRNO_EPERM = 0x00050000 | 1  # SCMP_ACT_ERRNO(EPERM)


class SeccompUnavailable(RuntimeError):
    """libseccomp cannot be loaded or refused to build the filter."""


@lru_cache(maxsize=1)
def filter_bytes() -> bytes:
    """The compiled filter (BPF instructions, as ``bwrap --seccomp`` reads them)."""
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise SeccompUnavailable(f"libseccomp is not installed ({e})") from e
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        for syscall in DENIED:
            nr = lib.seccomp_syscall_resolve_name(syscall.encode())
            if nr < 0:  # not a system call on this architecture
                continue
            if lib.seccomp_rule_add(ctx, _ERRNO_EPERM, nr, 0) != 0:
                raise SeccompUnavailable(f"seccomp_rule_add({syscall}) failed")
        with tempfile.TemporaryFile() as f:
            if lib.seccomp_export_bpf(ctx, f.fileno()) != 0:
                raise SeccompUnavailable("seccomp_export_bpf failed")
            f.seek(0)
            return f.read()
    finally:
        lib.seccomp_release(ctx)


def filter_fd() -> int:
    """A readable descriptor positioned at the start of the filter (the caller closes it)."""
    data = filter_bytes()
    r, w = os.pipe()
    if len(data) > 65536:  # larger than a pipe buffer: a temporary file instead
        os.close(r)
        os.close(w)
        f = tempfile.TemporaryFile()
        f.write(data)
        f.flush()
        f.seek(0)
        return os.dup(f.fileno())
    os.write(w, data)
    os.close(w)
    return r
