"""Atomic file writes: a reader (a PLC, a dashboard) never sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends.

    ``os.replace`` is atomic within one filesystem, which is why the temporary file lives
    in the destination folder rather than in /tmp. If the block raises, the temporary
    file is removed and ``path`` is untouched: a reader never sees half a file. The file
    gets ``mode`` (mkstemp's own 0600 would hide results from a reader under another
    account, e.g. an SMB share or a dashboard).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, fsync: bool = True, mode: int = 0o644
) -> Path:
    """Write ``data`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path, fsync=fsync, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, fsync: bool = True, mode: int = 0o644
) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync, mode=mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, fsync: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", fsync=fsync)


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
