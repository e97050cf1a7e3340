"""The device's durable SQLite outbox: nothing leaves it before the cloud acknowledged it."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
import torch

from cdcca.runtime.outbox import _SCHEMA, Outbox, OutboxError
from cdcca.uplink import UplinkSample, UTSConfig, build_uplink, decode_uplink, select_tokens

torch.set_num_threads(1)


def _sample(i: int, C: int = 16, dtype=torch.float16, keep_ratio: float = 0.5, image: bytes | None = None) -> UplinkSample:
    g = torch.Generator().manual_seed(i)
    keep = select_tokens(torch.rand(1, 49, generator=g), keep_ratio)[0]
    return UplinkSample(f"dev1-{i}", torch.randn(49, C, generator=g).to(dtype), f"question {i}?", "red",
                        0.1 * (i % 10), 0.5 + 0.01 * i, keep, mc="blue", image_png=image)


def _same(a: UplinkSample, b: UplinkSample) -> bool:
    (ra, pa, Pa), (rb, pb, Pb) = a.packed(), b.packed()
    return (a.sample_id, a.question, a.answer, a.mc, a.image_png) == (b.sample_id, b.question, b.answer, b.mc, b.image_png) \
        and a.confidence == pytest.approx(b.confidence) and torch.equal(pa, pb) and Pa == Pb \
        and torch.equal(ra, rb) and ra.dtype == rb.dtype


def test_outbox_survives_reopen(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        for i in range(3):
            box.add(_sample(i))
    with Outbox(path) as box:
        assert box.size() == 3
        assert all(_same(a, _sample(i)) for i, a in enumerate(box.pending()))


def test_stored_tokens_round_trip_bit_exactly_for_fp16_and_fp32(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        box.add(_sample(1, dtype=torch.float16))
        box.add(_sample(2, dtype=torch.float32, keep_ratio=1.0))
        a, b = box.pending()
    assert _same(a, _sample(1, dtype=torch.float16)) and _same(b, _sample(2, dtype=torch.float32, keep_ratio=1.0))
    # packed: only the kept rows and their positions come back, never a zero-filled 49-row grid
    assert a.keep is None and a.tokens.shape == (24, 16) and a.grid == 49
    assert torch.equal(a.positions, _sample(1).keep.nonzero().flatten())


def test_add_is_idempotent_per_sample_id(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        assert box.add(_sample(1)) is True
        assert box.add(_sample(1)) is False
        assert box.add_many([_sample(1), _sample(2)]) == 1
        assert box.size() == 2


def test_pending_is_oldest_first_and_respects_the_limit(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        for i in (5, 3, 9, 1):
            box.add(_sample(i))
        assert [s.sample_id for s in box.pending(2)] == ["dev1-5", "dev1-3"]
        assert len(box.pending()) == 4


def test_ack_removes_only_acknowledged_samples_and_unacked_ones_stay(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        for i in range(4):
            box.add(_sample(i))
        ids = [s.sample_id for s in box.pending(3)]
        assert box.mark_sent(ids, "pkt-1") == 3
        assert [s.sample_id for s in box.pending()] == ["dev1-3"]          # sent ones are in flight
        assert box.ack(["dev1-0", "dev1-1", "never-added"]) == 2
    with Outbox(path) as box:
        assert box.size() == 2                                              # dev1-2 in flight, dev1-3 pending
        st = box.stats()
        assert (st.pending, st.in_flight) == (1, 1)
        assert box.requeue(packet_id="pkt-1") == 1                          # lost packet: send again
        assert [s.sample_id for s in box.pending()] == ["dev1-2", "dev1-3"]
        box.mark_sent(["dev1-2", "dev1-3"], "pkt-2")
        assert box.ack_packet("pkt-2") == 2 and box.size() == 0


def test_requeue_by_age_only_touches_old_packets(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        box.add(_sample(1))
        box.mark_sent(["dev1-1"], "p")
        assert box.requeue(older_than_s=3600) == 0
        assert box.requeue(older_than_s=-1) == 1


def test_bytes_accounting_counts_stored_payload(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        box.add(_sample(1, C=16))                      # 24 tokens × 16 × fp16
        box.add(_sample(2, C=16, image=b"\x89PNG\r\n\x1a\n" + b"x" * 92))
        assert box.nbytes() == 2 * 24 * 16 * 2 + 100
        box.mark_sent(["dev1-1"], "p")
        assert box.stats().pending_bytes == 24 * 16 * 2 + 100
        box.ack(["dev1-1", "dev1-2"])
        assert box.nbytes() == 0


def test_blobs_are_raw_array_bytes_never_pickle(tmp_path):
    path = tmp_path / "o.db"
    s = _sample(4)
    with Outbox(path) as box:
        box.add(s)
    db = sqlite3.connect(path)
    blob, dtype, shape = db.execute("SELECT tokens, tokens_dtype, tokens_shape FROM samples").fetchone()
    db.close()
    assert blob == s.tokens[s.keep].numpy().tobytes() and dtype == "float16" and shape == "[24, 16]"
    assert not blob.startswith(b"\x80")                # no pickle protocol header


def test_outbox_uses_wal_journal(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_nan_uncertainty_is_kept_as_nan(tmp_path):
    with Outbox(tmp_path / "o.db") as box:
        s = _sample(1)
        s.uncertainty = float("nan")
        box.add(s)
        assert math.isnan(box.pending()[0].uncertainty)


def test_a_garbage_file_gives_a_one_line_error(tmp_path):
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match="not a readable SQLite database") as err:
        Outbox(path)
    assert "\n" not in str(err.value) and "move the file aside" in str(err.value)


def test_a_damaged_database_gives_a_one_line_error(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.add_many([_sample(i, C=256) for i in range(20)])
        box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096:8192] = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))   # smash page 2
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError) as err:
        box = Outbox(path)
        box.pending()
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_outbox_feeds_the_uplink_packet_and_acks_what_the_cloud_decoded(tmp_path):
    cfg = UTSConfig()
    with Outbox(tmp_path / "o.db") as box:
        box.add_many([_sample(i) for i in range(5)])
        batch = box.pending(4)
        packet = build_uplink(batch, cfg, device_id="dev1", adapter_version="v2")
        box.mark_sent([s.sample_id for s in batch], "pkt-7")
        cloud = decode_uplink(packet)
        assert cloud.sample_ids == [s.sample_id for s in batch]
        assert all(s.keep is None and s.tokens.shape[0] < 49 for s in batch)      # packed all the way
        assert torch.equal(cloud.keep, torch.stack([_sample(i).keep for i in range(4)]))
        for i, s in enumerate(batch):
            assert torch.allclose(cloud.tokens[i][s.positions], s.tokens.float(), atol=0.03)
        box.ack(cloud.sample_ids)                       # the cloud's ack lists what it decoded
        assert [s.sample_id for s in box.pending()] == ["dev1-4"] and box.size() == 1


def test_an_outbox_written_before_packed_samples_reads_unchanged(tmp_path):
    """Schema 1 always stored kept rows + uint16 positions; an old file (made here with raw SQL, as the
    previous cdcca wrote it) is read as packed samples without any migration."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA + "PRAGMA user_version=1;")
    rows = np.arange(3 * 4, dtype=np.float16).reshape(3, 4)
    db.execute("INSERT INTO samples (sample_id, created, question, answer, mc, confidence, uncertainty, n_tokens, "
               "positions, tokens, tokens_dtype, tokens_shape, image_png, nbytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               ("old-1", 0.0, "q?", "red", "red", 0.5, 0.1, 49, np.array([2, 7, 40], np.uint16).tobytes(),
                rows.tobytes(), "float16", "[3, 4]", None, rows.nbytes))
    db.commit()
    db.close()
    with Outbox(path) as box:
        (s,) = box.pending()
    assert s.positions.tolist() == [2, 7, 40] and s.grid == 49 and torch.equal(s.tokens, torch.from_numpy(rows))
    batch = decode_uplink(build_uplink([s], UTSConfig(token_dtype="fp16"), device_id="d", adapter_version="v"))
    assert batch.sent[0].nonzero().flatten().tolist() == [2, 7, 40]


def test_stored_positions_out_of_order_are_refused_in_one_line(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.add(_sample(1))
        box._db.execute("UPDATE samples SET positions=?", (np.arange(24, 0, -1, dtype=np.uint16).tobytes(),))
        with pytest.raises(OutboxError, match="malformed") as err:
            box.pending()
    assert "\n" not in str(err.value)
