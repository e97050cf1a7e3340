"""The files of an adapter store: version files (safetensors + metadata), the directory lock, and the
checks on packet metadata. :mod:`cdcca.runtime.adapter_store` holds the rules; this module the bytes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import safetensors.torch
from safetensors.torch import load as load_safetensors  # safetensors bytes: no code execution, unlike pickle

from cdcca.adapter_state import AdapterState, state_hash
from cdcca.wire import PacketError

try:  # POSIX advisory locking; without it the single-writer rule is simply not enforced
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

STORE_FORMAT = 1
CONFIG_FILE, CURRENT_FILE, LOCK_FILE = "store.json", "CURRENT", "LOCK"
VERSION_RE = re.compile(r"^v(\d{6,})\.safetensors$")
TMP_RE = re.compile(r"^\..+\.tmp$")


class StoreError(RuntimeError):
    """The store directory is missing, corrupt, busy, or an operation on it is impossible."""


def vname(version: int) -> str:
    return f"v{version:06d}.safetensors"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def serialize(state: AdapterState, meta: dict[str, str]) -> bytes:
    return safetensors.torch.save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                                  metadata=meta)


def load_version_file(path: Path) -> tuple[AdapterState, dict[str, str]]:
    """Load and verify one version file; raises StoreError saying what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{path.name} is unreadable ({e.strerror or e})") from None
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        state = dict(load_safetensors(data))
    except Exception as e:
        raise StoreError(f"{path.name} is not a valid safetensors file ({type(e).__name__})") from None
    h = state_hash(state)
    if meta.get("hash") != h:
        raise StoreError(f"{path.name} content hash {h[:12]} does not match its recorded hash "
                         f"{str(meta.get('hash'))[:12]}")
    m = VERSION_RE.match(path.name)
    if m is None or meta.get("version") != str(int(m.group(1))):
        raise StoreError(f"{path.name} records version {meta.get('version')!r}")
    return state, meta


@contextlib.contextmanager
def locked(d: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"adapter store {d} is being written by another process; retry later") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def int_meta(meta: dict[str, str], key: str) -> int:
    s = meta.get(key, "")
    if not re.fullmatch(r"[0-9]{1,18}", s):
        raise PacketError(f"packet meta {key}={s!r} is not a non-negative integer")
    return int(s)


def hash_meta(meta: dict[str, str], key: str) -> str:
    s = meta.get(key, "")
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise PacketError(f"packet meta {key} is not a SHA-256 hex digest")
    return s
