"""How many samples a device's outbox holds, read without torch or the runtime.

The cloud asks every device for this between rounds (to start a round when enough is queued), and
Flower starts a fresh process for each such message: importing the device runtime (torch, the model
code) would cost seconds of CPU per question on the device. This reads the outbox's SQLite file
read-only; :class:`cdcca.runtime.outbox.Outbox` owns the schema and writes it.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

OUTBOX_FILE = "outbox.sqlite"


def _read(state_dir: str | Path, sql: str) -> list[tuple]:
    path = Path(state_dir) / OUTBOX_FILE
    if not path.is_file():
        return []
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            return db.execute(sql).fetchall()
    except sqlite3.Error as exc:
        raise RuntimeError(f"cannot read the outbox {path} ({exc}); is it a cdcca device state?") from None


def outbox_ids(state_dir: str | Path) -> set[str]:
    """The sample ids still in the outbox (pending or in flight): not yet acknowledged by the cloud."""
    return {sid for (sid,) in _read(state_dir, "SELECT sample_id FROM samples")}


def outbox_queue(state_dir: str | Path) -> dict[str, int]:
    """``{"pending": n, "in_flight": m, "shift_at": k, "shift_queued": q}`` for the device state in ``state_dir``
    (zeros before its first request); ``shift_at`` > 0: the device reported a shift after k requests that no uplink
    has carried samples from yet, and ``shift_queued`` samples queued since wait to be sent (the ServerApp counts the
    report once q reaches half an early round: ``cdcca.fleet.server.tally_queues``)."""
    rows = _read(state_dir, "SELECT COALESCE(SUM(packet_id IS NULL), 0), COALESCE(SUM(packet_id IS NOT NULL), 0) "
                            "FROM samples")
    pending, in_flight = rows[0] if rows else (0, 0)
    columns = {r[1] for r in _read(state_dir, "PRAGMA table_info(shift)")}        # none: no table yet
    after = "shift.after_seq" if "after_seq" in columns else "0"                 # the table's first form: all count
    shift = _read(state_dir, f"SELECT at, (SELECT COUNT(*) FROM samples WHERE packet_id IS NULL AND seq > {after}) "
                             "FROM shift") if columns else []
    at, queued = shift[0] if shift else (0, 0)
    return {"pending": int(pending), "in_flight": int(in_flight), "shift_at": int(at), "shift_queued": int(queued)}
