"""The cloud's SQLite registry (``cloud.sqlite`` in its state dir) and the fleet groups kept in it.

Tables: packets (uplinks as received), samples (id → packet, round processed), devices (mirror version,
hash, rounds, DWC budget), updates (stored update packets, paths relative to the state dir), metrics,
groups. :class:`cdcca.runtime.cloud.CloudRuntime` owns the rounds' transactions; this module opens the file
and commits uplinks to the inbox (:func:`commit_uplink`), without torch, so ``cdcca cloud receive`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from cdcca.atomic import transaction, write_json
from cdcca.trained_pair import adopt, recorded
from cdcca.uplink.check import CheckedUplink, check_uplink
from cdcca.wire import require_plain_name, write_packet

SCHEMA = """
CREATE TABLE IF NOT EXISTS packets (sha TEXT PRIMARY KEY, device_id TEXT NOT NULL, nbytes INTEGER, received REAL);
CREATE TABLE IF NOT EXISTS samples (sample_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, packet_sha TEXT NOT NULL,
                                    round INTEGER);
CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, version INTEGER NOT NULL, hash TEXT NOT NULL,
                                    rounds INTEGER NOT NULL DEFAULT 0, budget INTEGER);
CREATE TABLE IF NOT EXISTS updates (device_id TEXT, base_version INTEGER, new_version INTEGER, path TEXT, nbytes INTEGER,
                                    PRIMARY KEY (device_id, base_version));
CREATE TABLE IF NOT EXISTS metrics (device_id TEXT, round INTEGER, json TEXT, PRIMARY KEY (device_id, round));
CREATE TABLE IF NOT EXISTS groups (device_id TEXT PRIMARY KEY, group_id TEXT NOT NULL);
"""


def open_db(state_dir: Path) -> sqlite3.Connection:
    """The cloud's SQLite registry (WAL, full sync), its tables created if missing."""
    db = sqlite3.connect(str(Path(state_dir) / "cloud.sqlite"), isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


def remembered_tiny(state_dir: Path, tiny: bool | None) -> bool:
    """Whether the state dir's models are tiny: as recorded at creation (recorded now if new, with the pair
    it serves); the recorded pair is served from now on (:func:`cdcca.trained_pair.adopt`)."""
    record = state_dir / "cloud.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        adopt(saved.get("weights"), state_dir)
        created = bool(saved.get("tiny", False))
        if tiny is not None and tiny != created:
            raise ValueError(f"the cloud state at {state_dir} was created with {'tiny' if created else 'the real'} models; "
                             f"open it without --tiny/--no-tiny, or use a new state dir")
        return created
    tiny = bool(tiny)
    write_json(record, {"tiny": tiny, "weights": recorded(), "created": time.time()})
    return tiny


@dataclass(frozen=True)
class InboxReceipt:
    """What committing one uplink did: the packet's SHA-256, its sample ids (now safe to drop on the
    device) and how many of them were new to the inbox."""

    sha: str
    sample_ids: list[str]
    new: int


def commit_uplink(db: sqlite3.Connection, state_dir: Path, uplink: bytes,
                  checked: CheckedUplink | None = None) -> InboxReceipt:
    """The one inbox write: check the packet (unless ``checked`` is its :func:`check_uplink`), store it as
    ``uplinks/<sha>.pkt`` (atomically) and record it and its samples in one transaction. Idempotent."""
    checked = checked or check_uplink(uplink)
    sha = hashlib.sha256(uplink).hexdigest()
    path = Path(state_dir) / "uplinks" / f"{sha}.pkt"
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        write_packet(path, uplink)
    device_id = checked.device_id
    with transaction(db):
        db.execute("INSERT OR IGNORE INTO packets VALUES (?,?,?,?)", (sha, device_id, len(uplink), time.time()))
        new = db.executemany("INSERT OR IGNORE INTO samples(sample_id, device_id, packet_sha) VALUES (?,?,?)",
                             [(sid, device_id, sha) for sid in checked.sample_ids]).rowcount
    return InboxReceipt(sha, checked.sample_ids, new)


def stored_sample_ids(state_dir: Path) -> set[str]:
    """Every sample id the cloud has committed, read-only: safe beside a running cloud (and none before it ran)."""
    path = Path(state_dir) / "cloud.sqlite"
    if not path.is_file():
        return set()
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        return {sid for (sid,) in db.execute("SELECT sample_id FROM samples")}


class GroupRegistry:
    """Which fleet group each device belongs to (the ``groups`` table). Groups are the operator's
    decision — this API, the Flower run config, ``cdcca cloud group`` — never a device's claim."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def set(self, device_id: str, group: str | None) -> None:
        require_plain_name("device id", device_id)
        if group is None:
            self.db.execute("DELETE FROM groups WHERE device_id=?", (device_id,))
        else:
            self.db.execute("INSERT OR REPLACE INTO groups VALUES (?,?)", (device_id, require_plain_name("group name", group)))

    def group_of(self, device_id: str) -> str | None:
        row = self.db.execute("SELECT group_id FROM groups WHERE device_id=?", (device_id,)).fetchone()
        return row[0] if row else None

    def members(self, group: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT device_id FROM groups WHERE group_id=? ORDER BY device_id", (group,))]

    def assignments(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT device_id, group_id FROM groups ORDER BY device_id"))


def group_registry(state_dir) -> GroupRegistry:
    """The group registry of a cloud state dir, without loading any model (created if new)."""
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    return GroupRegistry(open_db(Path(state_dir)))
