"""Device-side versioned adapter store: verify, apply atomically, roll back.

Layout of a store directory::

    store.json            {"format": 1, "device_id": ..., "keep": K}   (written once by init)
    v000007.safetensors   one adapter version; safetensors metadata: format, version, hash
                          (state_hash of the tensors), created (UTC ISO-8601), parent (version it
                          was derived from, "" for the first), device_id
    CURRENT               JSON {"version": 7, "hash": "..."}: the version in use
    LOCK                  advisory lock (fcntl) held while a write is in progress

Every file is written atomically: temp file ``.<name>.<random>.tmp`` in the same directory,
fsync, ``os.replace``, fsync of the directory. A new version is written *before* CURRENT is
switched to it, and old versions are pruned only after CURRENT is durable, so a power cut at any
point leaves CURRENT naming a complete, hash-verified version (the worst case is an orphaned new
version file, or a stray temp file that the next open deletes).

Versions and rollback: ``rollback(v)`` only repoints CURRENT at the kept file ``v`` (no new
version number). Newer files stay on disk, so rolling forward again works, until the next
update/resync commits a new version: that commit deletes every version newer than its parent
(the abandoned branch) and keeps the ``keep`` highest versions up to the new one.

Open (``AdapterStore(dir)``) verifies CURRENT and the file it names; if either is missing or
corrupt it falls back to the newest version whose file verifies, repoints CURRENT at it, logs a
warning and records the reason in :attr:`AdapterStore.recovery_note`.

One writer at a time per directory (a second concurrent writer gets a :class:`StoreError`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from cdcca import wire
from cdcca.adapter_state import AdapterState, clone_state, state_hash
from cdcca.atomic import atomic_write, fsync_dir
from cdcca.downlink import DWC_FORMAT, apply_delta, decode_resync, decode_update
from cdcca.runtime.version_files import (
    CONFIG_FILE,
    CURRENT_FILE,
    STORE_FORMAT,
    TMP_RE,
    VERSION_RE,
    StoreError,
    hash_meta,
    int_meta,
    load_version_file,
    locked,
    now,
    serialize,
    vname,
)
from cdcca.wire import PacketError

__all__ = ["AdapterStore", "StaleBaseError", "StoreError", "WrongDeviceError"]

log = logging.getLogger(__name__)


class StaleBaseError(PacketError):
    """An update was built for a different base than the device holds; it needs a full resync."""


class WrongDeviceError(PacketError):
    """A packet addressed to another device."""


class AdapterStore:
    """Versioned on-disk adapter state of one device (see module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike[str], *, keep: int | None = None):
        self.path = Path(path)
        self.recovery_note: str | None = None
        fix = f"create it with AdapterStore.init({str(self.path)!r}, state)"
        if not self.path.is_dir():
            raise StoreError(f"no adapter store at {self.path} (directory missing); {fix}")
        cfg_path = self.path / CONFIG_FILE
        if not cfg_path.exists():
            raise StoreError(f"{self.path} is not an adapter store ({CONFIG_FILE} missing); {fix}")
        try:
            cfg = json.loads(cfg_path.read_text("utf-8"))
            if cfg.get("format") != STORE_FORMAT or not isinstance(cfg.get("keep"), int) or cfg["keep"] < 1:
                raise ValueError("unexpected content")
        except (OSError, ValueError, AttributeError) as e:
            raise StoreError(f"adapter store config {cfg_path} is corrupt ({e}); restore it or re-create "
                             f"the store with AdapterStore.init({str(self.path)!r}, state, force=True)") from None
        self.device_id: str | None = cfg.get("device_id")
        self.keep: int = keep if keep is not None else cfg["keep"]
        if not (isinstance(self.keep, int) and self.keep >= 1):
            raise ValueError(f"keep={keep!r}: must be an int >= 1")
        self._clean_temp_files()
        self._load_current()

    # ---------------------------------------------------------------- creation

    @classmethod
    def init(cls, path: str | os.PathLike[str], state: AdapterState, version: int = 0, keep: int = 5, *,
             device_id: str | None = None, force: bool = False) -> AdapterStore:
        """Create a store holding ``state`` as ``version`` (refuses an existing store unless ``force``)."""
        p = Path(path)
        if not (isinstance(keep, int) and keep >= 1):
            raise ValueError(f"keep={keep!r}: must be an int >= 1")
        if not (isinstance(version, int) and version >= 0):
            raise ValueError(f"version={version!r}: must be an int >= 0")
        for k, v in state.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise ValueError(f"adapter tensor {k!r} must be a floating-point torch.Tensor")
        p.mkdir(parents=True, exist_ok=True)
        existing = (p / CONFIG_FILE).exists() or (p / CURRENT_FILE).exists() or any(
            VERSION_RE.match(f.name) for f in p.iterdir())
        if existing and not force:
            raise StoreError(f"an adapter store already exists at {p}; open it with AdapterStore({str(p)!r}) "
                             f"or pass force=True to replace it")
        with locked(p):
            h = state_hash(state)
            atomic_write(p / vname(version), serialize(state, {
                "format": str(STORE_FORMAT), "version": str(version), "hash": h, "created": now(),
                "parent": "", "device_id": device_id or ""}))
            atomic_write(p / CONFIG_FILE, json.dumps({"format": STORE_FORMAT, "device_id": device_id,
                                                   "keep": keep}).encode())
            atomic_write(p / CURRENT_FILE, json.dumps({"version": version, "hash": h}).encode())
            for f in p.iterdir():
                if VERSION_RE.match(f.name) and f.name != vname(version):
                    f.unlink()
            fsync_dir(p)
        return cls(p)

    # ---------------------------------------------------------------- reading

    @property
    def version(self) -> int:
        return self._version

    @property
    def hash(self) -> str:
        return self._hash

    def changed_on_disk(self) -> bool:
        """True when another process (``cdcca device apply``, a fleet client) has made a different
        version current since this store was opened: re-open it to follow."""
        try:
            cur = json.loads((self.path / CURRENT_FILE).read_text("utf-8"))
            return (cur.get("version"), cur.get("hash")) != (self._version, self._hash)
        except (OSError, ValueError, AttributeError):
            return False          # mid-write or damaged: keep serving the verified version in memory

    def current(self) -> tuple[int, AdapterState, str]:
        """(version, state, hash) of the version in use (state verified when loaded; a copy)."""
        return self._version, clone_state(self._state), self._hash

    def versions(self) -> list[int]:
        """Version numbers with a file on disk, ascending (not verified)."""
        out = []
        for f in self.path.iterdir():
            m = VERSION_RE.match(f.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def load(self, version: int) -> tuple[AdapterState, str]:
        """(state, hash) of a kept version, verified; StoreError if missing or corrupt."""
        if version not in self.versions():
            raise StoreError(f"version {version} is not kept in {self.path} (kept: {self.versions()})")
        try:
            state, meta = load_version_file(self.path / vname(version))
        except StoreError as e:
            raise StoreError(f"version {version} in {self.path} is corrupt: {e}") from None
        return state, meta["hash"]

    # ---------------------------------------------------------------- writing

    def apply(self, pkt: wire.Packet, nbytes: int = 0) -> dict[str, Any]:
        """Apply an already-decoded ``"update"`` or ``"resync"`` packet (see :meth:`apply_update`,
        :meth:`apply_resync`): a caller that decoded the packet to route it need not decode it again.
        ``nbytes``: the packet's size on the wire, for the report."""
        if pkt.kind == "update":
            return self._apply_update(pkt, nbytes)
        if pkt.kind == "resync":
            return self._apply_resync(pkt)
        raise PacketError(f"device got a {pkt.kind!r} packet; it applies only 'update' or 'resync' packets")

    def apply_update(self, packet_bytes: bytes) -> dict[str, Any]:
        """Verify and apply an ``"update"`` packet as a new version (all or nothing).

        Raises PacketError for a bad packet, :class:`WrongDeviceError` for another device's packet,
        :class:`StaleBaseError` when it was built for a base other than the current version (ask the
        cloud for a resync). Re-applying the packet that produced the current version returns
        ``{"status": "already_applied", ...}``.
        """
        return self._apply_update(wire.decode(packet_bytes, expect_kind="update"), len(packet_bytes))

    def _apply_update(self, pkt: wire.Packet, nbytes: int) -> dict[str, Any]:
        self._check_device(pkt.meta)
        meta = pkt.meta
        base_v, new_v = int_meta(meta, "base_version"), int_meta(meta, "new_version")
        base_h, result_h = hash_meta(meta, "base_hash"), hash_meta(meta, "result_hash")
        if new_v == self._version and result_h == self._hash:
            return {"status": "already_applied", "version": self._version, "hash": self._hash}
        if base_v != self._version or base_h != self._hash:
            raise StaleBaseError(
                f"update {base_v}->{new_v} was built for base version {base_v} ({base_h[:12]}) but "
                f"device {self.device_id or '?'} is at version {self._version} ({self._hash[:12]}); "
                f"nothing changed; ask the cloud for a full resync")
        if new_v <= base_v:
            raise PacketError(f"update new_version {new_v} is not above base_version {base_v}")
        delta = decode_update(pkt)
        try:
            new_state = apply_delta(self._state, delta)
        except ValueError as e:
            raise PacketError(f"update does not fit the current adapter: {e}") from None
        h = state_hash(new_state)
        if h != result_h:
            raise PacketError(f"update {base_v}->{new_v} produced hash {h[:12]}, packet promises "
                              f"{result_h[:12]}; nothing changed; ask the cloud for a full resync")
        pruned = self._commit(new_v, new_state, h)
        return {"status": "applied", "version": new_v, "hash": h, "base_version": base_v,
                "values": int(meta.get("n_values", "0") or 0), "packet_bytes": nbytes,
                "pruned": pruned}

    def apply_resync(self, packet_bytes: bytes) -> dict[str, Any]:
        """Install the dense state of a ``"resync"`` packet as a new version (after verifying its
        hash). Its version must be above the current one (or equal with the same hash: no-op)."""
        return self._apply_resync(wire.decode(packet_bytes, expect_kind="resync"))

    def _apply_resync(self, pkt: wire.Packet) -> dict[str, Any]:
        self._check_device(pkt.meta)
        v = int_meta(pkt.meta, "version")
        state = decode_resync(pkt)
        h = pkt.meta["result_hash"]
        if v == self._version and h == self._hash:
            return {"status": "already_applied", "version": v, "hash": h}
        if v <= self._version:
            raise PacketError(f"resync version {v} is not above the current version {self._version}; "
                              f"the cloud must send a newer version number")
        pruned = self._commit(v, state, h)
        return {"status": "installed", "version": v, "hash": h, "pruned": pruned}

    def rollback(self, version: int) -> dict[str, Any]:
        """Make a kept version current again by repointing CURRENT (no new version number)."""
        if version == self._version:
            return {"status": "already_current", "version": version, "hash": self._hash}
        state, h = self.load(version)
        previous = self._version
        with locked(self.path):
            atomic_write(self.path / CURRENT_FILE, json.dumps({"version": version, "hash": h}).encode())
        self._version, self._hash, self._state = version, h, state
        return {"status": "rolled_back", "version": version, "hash": h, "from": previous}

    # ---------------------------------------------------------------- internals

    def _check_device(self, meta: dict[str, str]) -> None:
        if self.device_id is not None and meta.get("device_id") != self.device_id:
            raise WrongDeviceError(f"packet is for device {meta.get('device_id')!r}, this store belongs "
                                   f"to {self.device_id!r}; nothing changed")
        if meta.get("dwc_format") != DWC_FORMAT:
            raise PacketError(f"packet dwc_format={meta.get('dwc_format')!r}, expected {DWC_FORMAT!r}")

    def _commit(self, version: int, state: AdapterState, h: str) -> list[int]:
        """Write version file, then CURRENT, then prune; in-memory state changes only at the end."""
        parent = self._version
        with locked(self.path):
            try:
                cur = json.loads((self.path / CURRENT_FILE).read_text("utf-8"))
            except (OSError, ValueError):
                cur = None
            if cur != {"version": self._version, "hash": self._hash}:
                raise StoreError(f"adapter store {self.path} changed on disk since it was opened "
                                 f"(CURRENT is {cur}); reopen it and retry")
            atomic_write(self.path / vname(version), serialize(state, {
                "format": str(STORE_FORMAT), "version": str(version), "hash": h, "created": now(),
                "parent": str(parent), "device_id": self.device_id or ""}))
            atomic_write(self.path / CURRENT_FILE, json.dumps({"version": version, "hash": h}).encode())
            self._version, self._hash, self._state = version, h, state
            pruned = self._prune(parent)
        return pruned

    def _prune(self, parent: int) -> list[int]:
        """Delete the abandoned branch (versions above ``parent`` other than the new current one:
        left over from before a rollback, or orphaned by a crash) and all but the ``keep`` highest
        remaining versions. Called only after CURRENT is durable."""
        vs = self.versions()
        lineage = [v for v in vs if v <= parent or v == self._version]
        drop = sorted(set(vs) - set(lineage) | set(lineage[:-self.keep]))
        for v in drop:
            try:
                (self.path / vname(v)).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # best effort: CURRENT is already durable
                log.warning("adapter store %s: could not prune version %d: %s", self.path, v, e)
        if drop:
            fsync_dir(self.path)
        return sorted(drop)

    def _clean_temp_files(self) -> None:
        """Delete temp files left by an interrupted write (skipped while another writer is active)."""
        try:
            with locked(self.path):
                for f in self.path.iterdir():
                    if TMP_RE.match(f.name) and f.is_file():
                        with contextlib.suppress(OSError):
                            f.unlink()
        except StoreError:
            pass  # busy: its temp files are live

    def _load_current(self) -> None:
        problem = None
        try:
            cur = json.loads((self.path / CURRENT_FILE).read_text("utf-8"))
            v, h = cur["version"], cur["hash"]
            if not isinstance(v, int) or not isinstance(h, str):
                raise ValueError("bad fields")
        except FileNotFoundError:
            problem = "CURRENT is missing"
        except (OSError, ValueError, KeyError, TypeError):
            problem = "CURRENT is corrupt"
        if problem is None:
            try:
                state, meta = load_version_file(self.path / vname(v))
                if meta["hash"] != h:
                    raise StoreError(f"{vname(v)} holds hash {meta['hash'][:12]}, not {h[:12]}")
                self._version, self._hash, self._state = v, h, state
                return
            except StoreError as e:
                problem = f"CURRENT names version {v}, but {e}"
        for cand in reversed(self.versions()):
            try:
                state, meta = load_version_file(self.path / vname(cand))
            except StoreError:
                continue
            with locked(self.path):
                atomic_write(self.path / CURRENT_FILE, json.dumps({"version": cand, "hash": meta["hash"]}).encode())
            self._version, self._hash, self._state = cand, meta["hash"], state
            self.recovery_note = f"{problem}; fell back to version {cand}, the newest valid one"
            log.warning("adapter store %s: %s", self.path, self.recovery_note)
            return
        raise StoreError(f"adapter store {self.path}: {problem} and no kept version is loadable; "
                         f"re-create it with AdapterStore.init({str(self.path)!r}, state, force=True) "
                         f"from a cloud resync")
