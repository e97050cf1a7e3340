"""The cloud's SQLite registry (``cloud.sqlite`` in its state dir) and the fleet groups kept in it.

Tables: packets (uplinks as received), samples (id → packet, round processed), devices (mirror version,
hash, rounds, DWC budget), updates (stored update packets, paths relative to the state dir), metrics,
groups. :class:`cdcca.runtime.cloud.CloudRuntime` owns the transactions; this module opens the file.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from cdcca.wire import require_plain_name

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
