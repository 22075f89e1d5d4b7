"""Crash-safe file writes: write a temporary file in the target's folder, fsync it, rename it over the
target, fsync the folder. A reader (or a restart after SIGKILL or power loss) sees the old file or the
new one, never a torn one.

``atomic_folder`` does the same for a folder of files (a converted model, a LoRA adapter). Shared by every
writer of durable state: the SVD cache, the model cache, the expert store, training runs and vLLM's
adapter folders. Temporary files and folders start with ``.`` (files also end with ``.tmp``) so sweeps
can find what a killed writer left.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

TMP_SUFFIX = ".tmp"

# bytes, or a function that writes the content to the path it is given (e.g. safetensors' save_file)
Content = Union[bytes, Callable[[str], None]]


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames and new entries in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: str | os.PathLike, content: Content, prefix: str = "") -> Path:
    """A fully written, fsync'ed temporary file in ``directory`` (the caller renames or removes it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{prefix}", suffix=TMP_SUFFIX, dir=directory)
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            content(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a temporary file from ``write_temp`` into place, durably (same file system)."""
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write(path: str | os.PathLike, content: Content) -> None:
    """Replace ``path`` with ``content`` atomically and durably."""
    path = Path(path)
    tmp = write_temp(path.parent, content, prefix=path.name + ".")
    try:
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """A temporary folder beside ``target`` (``.<name>.XXXX``) to fill; when the block ends without an
    error, its files are fsync'ed (``durable``) and it replaces ``target`` in one rename. On an error it is
    removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if durable:
            for p in tmp.iterdir():
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
        if target.exists():  # an older or incomplete folder under the name
            shutil.rmtree(target)
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
