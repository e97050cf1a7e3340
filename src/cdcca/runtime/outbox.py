"""The device's durable uplink outbox: samples UTS chose to upload wait here until the cloud acks them.

One SQLite file (WAL journal, one transaction per call). A sample moves through three states::

    add() ──> pending ──mark_sent(ids, packet_id)──> in flight ──ack(ids)──> deleted
                 ^                                       │
                 └──────────── requeue(...) ─────────────┘   (packet lost: send again)

Nothing is removed before the cloud acknowledged it, so a crash or a lost packet never loses a
sample. Only the kept tokens are stored — raw bytes (``numpy.tobytes``) plus dtype and shape
columns, never pickle — so an outbox row holds exactly what would be uploaded, and :meth:`Outbox.pending`
returns it packed (kept rows + their grid positions, ``UplinkSample.positions``) for the packet to code
as is. Schema 1 has always stored this packed form, so every outbox written so far reads unchanged.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdcca.atomic import transaction
from cdcca.uplink import UplinkSample

SCHEMA_VERSION = 1
_DTYPES = {"float16": np.float16, "float32": np.float32}   # what token blobs may hold

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id    TEXT NOT NULL UNIQUE,
    created      REAL NOT NULL,
    question     TEXT NOT NULL,
    answer       TEXT NOT NULL,
    mc           TEXT NOT NULL,
    confidence   REAL NOT NULL,
    uncertainty  REAL,
    n_tokens     INTEGER NOT NULL,
    positions    BLOB NOT NULL,
    tokens       BLOB NOT NULL,
    tokens_dtype TEXT NOT NULL,
    tokens_shape TEXT NOT NULL,
    image_png    BLOB,
    nbytes       INTEGER NOT NULL,
    packet_id    TEXT,
    sent_at      REAL,
    attempts     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS samples_packet ON samples(packet_id);
"""
# a shift the device reported that no uplink has carried samples from yet (one row at most); ``after_seq``: the
# last sample queued before it. Added beside schema 1, which an older cdcca reads unchanged
_SHIFT_TABLE = ("CREATE TABLE IF NOT EXISTS shift (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL, "
                "z REAL NOT NULL, after_seq INTEGER NOT NULL DEFAULT 0)")


class OutboxError(RuntimeError):
    """The outbox file is unusable (corrupt, foreign, newer schema) or a stored row is malformed."""


@dataclass(frozen=True)
class OutboxStats:
    pending: int          # not yet sent
    in_flight: int        # sent, not yet acknowledged
    bytes: int            # stored token + image bytes over both
    pending_bytes: int


class Outbox:
    """Durable queue of :class:`UplinkSample` s keyed by their unique sample id."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open outbox {self.path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(f"outbox {self.path} has schema version {version}; this cdcca reads "
                                  f"{SCHEMA_VERSION}: upgrade cdcca")
            if version == 0:
                with transaction(self._db):
                    for stmt in filter(str.strip, _SCHEMA.split(";")):
                        self._db.execute(stmt)
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute(_SHIFT_TABLE)
            if "after_seq" not in {r[1] for r in self._db.execute("PRAGMA table_info(shift)")}:   # its first form
                self._db.execute("ALTER TABLE shift ADD COLUMN after_seq INTEGER NOT NULL DEFAULT 0")
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(samples)")}
            if not {"sample_id", "tokens", "tokens_dtype", "tokens_shape", "packet_id"} <= cols:
                raise OutboxError(f"outbox {self.path} has a foreign 'samples' table; move the file aside")
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise OutboxError(f"outbox {self.path} is not a readable SQLite database ({exc}); "
                              "move the file aside to start an empty outbox") from None
        except OutboxError:
            self._db.close()
            raise

    # -- plumbing ------------------------------------------------------------------------------
    def _run(self, fn):
        with self._lock:
            try:
                with transaction(self._db):
                    return fn(self._db)
            except sqlite3.DatabaseError as exc:
                raise OutboxError(f"outbox {self.path} failed: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    # -- API -----------------------------------------------------------------------------------
    def add(self, sample: UplinkSample) -> bool:
        """Store a sample; True if stored, False if its id is already in the outbox (idempotent)."""
        return self.add_many([sample]) == 1

    def add_many(self, samples: Iterable[UplinkSample]) -> int:
        """Store several samples in one transaction; returns how many were new."""
        rows = [_to_row(s) for s in samples]

        def go(db):
            n = 0
            for row in rows:
                n += db.execute(
                    "INSERT OR IGNORE INTO samples (sample_id, created, question, answer, mc, confidence, uncertainty, "
                    "n_tokens, positions, tokens, tokens_dtype, tokens_shape, image_png, nbytes) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row).rowcount
            return n

        return self._run(go)

    def pending(self, limit: int | None = None, *, include_in_flight: bool = False,
                newest: bool = False) -> list[UplinkSample]:
        """Samples not yet sent (plus, if asked, those sent but not yet acknowledged), oldest first; ``newest``:
        the ``limit`` most recent ones (still in the order queued), for a round that reacts to a shift."""
        where = "" if include_in_flight else "WHERE packet_id IS NULL"
        lim = -1 if limit is None else int(limit)
        rows = self._run(lambda db: db.execute(
            f"SELECT sample_id, question, answer, mc, confidence, uncertainty, n_tokens, positions, tokens, "
            f"tokens_dtype, tokens_shape, image_png FROM samples {where} ORDER BY seq {'DESC' if newest else ''} "
            f"LIMIT ?", (lim,)).fetchall())
        return [_from_row(r, self.path) for r in (rows[::-1] if newest else rows)]

    def mark_sent(self, ids: Sequence[str], packet_id: str) -> int:
        """Record that these samples went out in ``packet_id``; returns how many rows it touched. A reported
        shift is answered once a packet carries a sample queued after it: the round that trains on it is the
        one that reacts (a round whose uplink left before the shift is not)."""
        now = time.time()

        def go(db):
            n = sum(db.execute("UPDATE samples SET packet_id=?, sent_at=?, attempts=attempts+1 WHERE sample_id=?",
                               (str(packet_id), now, str(i))).rowcount for i in ids)
            db.execute("DELETE FROM shift WHERE EXISTS (SELECT 1 FROM samples WHERE packet_id = ? "
                       "AND seq > shift.after_seq)", (str(packet_id),))
            return n
        return self._run(go)

    def ack(self, ids: Sequence[str]) -> int:
        """The cloud acknowledged these samples: delete them. Unknown ids are ignored; returns deleted."""
        return self._run(lambda db: sum(db.execute("DELETE FROM samples WHERE sample_id=?", (str(i),)).rowcount
                                        for i in ids))

    def ack_packet(self, packet_id: str) -> int:
        """Acknowledge every sample sent in ``packet_id``."""
        return self._run(lambda db: db.execute("DELETE FROM samples WHERE packet_id=?", (str(packet_id),)).rowcount)

    def requeue(self, *, packet_id: str | None = None, older_than_s: float | None = None) -> int:
        """Make unacknowledged samples pending again (all in flight, one packet's, or those sent
        more than ``older_than_s`` seconds ago); returns how many."""
        sql, args = "UPDATE samples SET packet_id=NULL WHERE packet_id IS NOT NULL", []
        if packet_id is not None:
            sql += " AND packet_id=?"
            args.append(str(packet_id))
        if older_than_s is not None:
            sql += " AND sent_at < ?"
            args.append(time.time() - float(older_than_s))
        return self._run(lambda db: db.execute(sql, args).rowcount)

    def report_shift(self, at: int, z: float) -> None:
        """Record a detected shift (after ``at`` served requests, ``z`` standard errors) until an uplink carries
        samples queued after it (:meth:`mark_sent`)."""
        self._run(lambda db: db.execute(
            "INSERT OR REPLACE INTO shift (id, at, z, after_seq) VALUES (1, ?, ?, "
            "(SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'samples'))", (int(at), float(z))))

    def shift(self) -> tuple[int, float] | None:
        """The shift reported and not yet answered: (at, z), or None."""
        return self._run(lambda db: db.execute("SELECT at, z FROM shift").fetchone())

    def clear_shift(self) -> None:
        self._run(lambda db: db.execute("DELETE FROM shift"))

    def size(self) -> int:
        """Samples not yet acknowledged (pending + in flight)."""
        return self._run(lambda db: db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def nbytes(self) -> int:
        """Stored payload bytes (token and image blobs) not yet acknowledged."""
        return self.stats().bytes

    def stats(self) -> OutboxStats:
        row = self._run(lambda db: db.execute(
            "SELECT COALESCE(SUM(packet_id IS NULL), 0), COALESCE(SUM(packet_id IS NOT NULL), 0), "
            "COALESCE(SUM(nbytes), 0), COALESCE(SUM(CASE WHEN packet_id IS NULL THEN nbytes ELSE 0 END), 0) "
            "FROM samples").fetchone())
        return OutboxStats(*map(int, row))

    def __len__(self) -> int:
        return self.size()


def _to_row(s: UplinkSample) -> tuple:
    if not isinstance(s.sample_id, str) or not s.sample_id:
        raise ValueError("an outbox sample needs a non-empty string sample_id")
    tokens = s.tokens.detach().cpu()
    if tokens.ndim != 2:
        raise ValueError(f"sample {s.sample_id!r}: tokens must be (P, C), got {tuple(tokens.shape)}")
    P = tokens.shape[0]
    keep = torch.ones(P, dtype=torch.bool) if s.keep is None else torch.as_tensor(s.keep).bool().reshape(-1)
    if keep.numel() != P or not keep.any():
        raise ValueError(f"sample {s.sample_id!r}: keep must have {P} entries with at least one True")
    pos = keep.nonzero().flatten()
    kept = tokens[pos]
    if kept.dtype not in (torch.float16, torch.float32):
        kept = kept.float()
    arr = np.ascontiguousarray(kept.numpy())
    blob = arr.tobytes()
    image = bytes(s.image_png) if s.image_png else None
    return (s.sample_id, time.time(), str(s.question), str(s.answer), str(s.mc), float(s.confidence),
            float(s.uncertainty), P, pos.numpy().astype(np.uint16).tobytes(), blob, str(arr.dtype),
            json.dumps(list(arr.shape)), image, len(blob) + len(image or b""))


def _from_row(r: tuple, path: Path) -> UplinkSample:
    sid, q, a, mc, conf, unc, P, pos_blob, blob, dtype, shape_json, image = r
    try:
        shape = tuple(json.loads(shape_json))
        np_dtype = _DTYPES[dtype]
        arr = np.frombuffer(blob, dtype=np_dtype).reshape(shape)
        pos = np.frombuffer(pos_blob, dtype=np.uint16).astype(np.int64)
        if len(shape) != 2 or not 0 < len(pos) == shape[0] or not 1 <= P <= 256 or (pos >= P).any() \
                or (np.diff(pos) <= 0).any():
            raise ValueError("positions do not match the tokens")
    except (ValueError, KeyError, TypeError) as exc:
        raise OutboxError(f"outbox {path}: stored sample {sid!r} is malformed ({exc}); ack or delete it") from None
    # packed: the kept rows and their positions go to the packet as stored, no zero-filled (P, C) grid
    return UplinkSample(sid, torch.from_numpy(arr.copy()), q, a, conf, float("nan") if unc is None else unc, None, mc,
                        bytes(image) if image is not None else None, positions=torch.from_numpy(pos), grid=int(P))
