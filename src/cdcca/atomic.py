"""One way to write a file, and one way to change a SQLite store, so that a crash at any moment leaves
either the old or the new content."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(d: Path) -> None:
    """Persist a rename in ``d`` (POSIX); best effort where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Temp file in the same directory, fsync, ``os.replace``, fsync the directory."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def write_json(path: str | os.PathLike[str], obj) -> None:
    """JSON (indented, keys sorted) written atomically; the parent folder is created if missing."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_safetensors(path: str | os.PathLike[str], tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically (tensors made contiguous; metadata is strings only)."""
    from safetensors.torch import save

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def link_or_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """``target`` gets ``source``'s content: a hard link where the filesystem allows (a group's mirror
    shared by its members costs its bytes once), else an atomic copy. Never half-written."""
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write(target, source.read_bytes())
        return
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any error (a connection opened with
    ``isolation_level=None``): every write of a store's transaction lands, or none does."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
