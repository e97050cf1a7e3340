"""The device notices a shift from its own uncertainty, and a reacting fleet answers it with an early round."""

import numpy as np
import pytest

from cdcca.config import resolve
from cdcca.fleet.local import LocalFleet
from cdcca.runtime.shift import ShiftDetector, ShiftReport


def _noise(n: int, mean: float, seed: int) -> list[float]:
    return np.clip(np.random.default_rng(seed).normal(mean, 0.1, n), 0, 1).tolist()


def test_the_detector_fires_on_a_jump_and_not_on_a_steady_stream():
    steady = ShiftDetector()
    assert steady.observe(_noise(2000, 0.2, 0)) is None and steady.served == 2000

    jump = ShiftDetector()
    assert jump.observe(_noise(300, 0.2, 1)) is None
    report = jump.observe(_noise(200, 0.5, 2))               # the device's answers get less certain
    assert report is not None and 300 < report.at <= 300 + jump.window and report.z > jump.z
    assert jump.observe(_noise(400, 0.5, 3)) is None          # a lasting shift is reported once


def test_a_drop_in_uncertainty_is_not_a_shift_and_bad_settings_are_refused():
    assert ShiftDetector().observe(_noise(200, 0.5, 4) + _noise(200, 0.1, 5)) is None
    with pytest.raises(ValueError, match="z > 0"):
        ShiftDetector(z=0)


def _pooled_tokens(n: int, offset: float, seed: int, width: int = 64) -> np.ndarray:
    """Pooled visual tokens of ``n`` images: a few shared factors (images differ in content) plus noise;
    ``offset`` moves the mean along a fixed direction, as a corruption moves the image statistics."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(4, width))
    direction = np.random.default_rng(98).normal(size=width)
    return rng.normal(size=(n, 4)) @ mixing + 0.3 * rng.normal(size=(n, width)) + offset * direction


def test_the_token_signal_fires_on_a_move_either_way_and_not_on_a_steady_stream():
    steady = ShiftDetector(z=8)
    assert steady.observe(_pooled_tokens(2000, 0.0, 0)) is None
    for offset in (0.5, -0.5):                       # brighter or darker: a shift whichever way the tokens move
        jump = ShiftDetector(z=8)
        assert jump.observe(_pooled_tokens(300, 0.0, 1)) is None
        report = jump.observe(_pooled_tokens(200, offset, 2))
        assert report is not None and 300 < report.at <= 300 + jump.window, (offset, report)
        assert jump.observe(_pooled_tokens(400, offset, 3)) is None     # reported once


def test_seeded_with_clean_source_images_the_first_shift_of_a_stream_counts_too():
    source = _pooled_tokens(160, 0.0, 4)
    shifted = ShiftDetector.seeded(source, z=8)
    report = shifted.observe(_pooled_tokens(40, 0.5, 5))          # the stream starts shifted
    assert report is not None and report.at <= shifted.window
    assert ShiftDetector.seeded(source, z=8).observe(_pooled_tokens(400, 0.0, 6)) is None


class _FiresOnce:
    """A detector that reports a shift on the first requests it sees (what a real one does on a new domain)."""

    def __init__(self):
        self.fired = False

    def observe(self, uncertainties):
        if self.fired:
            return None
        self.fired = True
        return ShiftReport(at=len(uncertainties), z=9.9)


def test_a_shift_report_triggers_an_early_round_before_the_rest_of_the_round_is_served(tmp_path):
    cfg = resolve("tiny", sets=["fleet.early_round=4", "uts.shift_z=5"])
    fleet = LocalFleet.setup(cfg, tmp_path)
    dev = fleet.devices[0]
    dev.shift = _FiresOnce()
    try:
        (row,) = fleet.run_round(0)
        assert dev.shift_pending is None                            # answered
    finally:
        fleet.close()
    assert row["early_rounds"] == 1 and row["version"] == 2        # the early update, then the round's own
    assert row["uploads"] > 0 and len(row["correct"]) == 8


def test_the_device_reports_a_shift_in_its_status_and_uploads_more_after_it(tmp_path):
    cfg = resolve("tiny", sets=["uts.shift_z=5", "uts.budget=2", "uts.shift_boost=2"])
    fleet = LocalFleet.setup(cfg, tmp_path)
    dev = fleet.devices[0]
    dev.shift = _FiresOnce()
    try:
        fleet.traffic[dev.device_id].serve(dev, 0)
        assert dev.status()["shift"] == {"at": 8, "z": 9.9}
        assert dev.outbox.size() == 4                                 # twice the budget of 2
    finally:
        fleet.close()


def test_a_shift_report_stays_until_an_uplink_carries_samples_queued_after_it(tmp_path):
    """A round whose uplink left before the shift does not answer it (its update was trained on the old domain):
    the report stays for the next round; the first packet with a sample from after the shift answers it."""
    from tests.runtime.test_outbox import _sample

    from cdcca.runtime.outbox import Outbox
    from cdcca.runtime.queue_status import outbox_queue

    box = Outbox(tmp_path / "outbox.sqlite")
    assert box.shift() is None and outbox_queue(tmp_path)["shift_at"] == 0
    box.add_many([_sample(0), _sample(1)])                          # the old domain's uploads
    box.report_shift(312, 6.5)
    assert box.shift() == (312, 6.5) and outbox_queue(tmp_path)["shift_at"] == 312   # read-only, no torch
    assert outbox_queue(tmp_path)["shift_queued"] == 0                # nothing from the new domain to send yet
    box.mark_sent(["dev1-0", "dev1-1"], packet_id="before")          # a round already under way takes them
    assert outbox_queue(tmp_path)["shift_at"] == 312                 # not answered
    box.add_many([_sample(2)])                                        # served after the shift
    assert outbox_queue(tmp_path)["shift_queued"] == 1                # a round for the shift has something to learn
    box.mark_sent(["dev1-2"], packet_id="after")
    assert box.shift() is None and outbox_queue(tmp_path)["shift_at"] == 0
    box.close()


def test_an_outbox_with_the_first_form_of_the_shift_table_opens_and_keeps_its_report(tmp_path):
    import sqlite3

    from cdcca.runtime.outbox import Outbox

    Outbox(tmp_path / "outbox.sqlite").close()
    with sqlite3.connect(tmp_path / "outbox.sqlite") as db:            # as the previous release wrote it
        db.execute("DROP TABLE shift")
        db.execute("CREATE TABLE shift (id INTEGER PRIMARY KEY CHECK (id = 1), at INTEGER NOT NULL, z REAL NOT NULL)")
        db.execute("INSERT INTO shift (id, at, z) VALUES (1, 40, 9.0)")
    from cdcca.runtime.queue_status import outbox_queue

    assert outbox_queue(tmp_path)["shift_at"] == 40                   # read before the device opens it again
    box = Outbox(tmp_path / "outbox.sqlite")
    assert box.shift() == (40, 9.0)
    box.close()


def test_the_server_starts_a_round_when_a_device_reports_a_shift(tmp_path):
    from cdcca.fleet.server import RoundTrigger

    now = [0.0]
    queue = iter([(3, 0), (5, 1)])                 # a few uploads, then a device reports a shift
    trigger = RoundTrigger(resolve(sets=["fleet.min_uploads=64", "fleet.early_round=20"]), lambda: next(queue),
                           tmp_path / "stop", sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert trigger.wait() == "shift" and now[0] == 5.0
    both = RoundTrigger(resolve(sets=["fleet.min_uploads=4"]), lambda: (5, 1), tmp_path / "stop",
                        sleep=lambda s: None, clock=lambda: now[0])
    assert both.wait() == "shift"                  # enough uploads too: the round is named for the shift
    plain = RoundTrigger(resolve(sets=["fleet.min_uploads=64", "fleet.early_round=0"]), lambda: (5, 1), tmp_path / "stop",
                         sleep=lambda s: (tmp_path / "stop").touch(), clock=lambda: now[0])
    assert plain.wait() is None                    # early rounds off: a report alone starts nothing


def test_a_round_that_reacts_to_a_shift_takes_the_newest_uploads_and_leaves_the_backlog(tmp_path):
    """The old domain's backlog is not what the first update after a shift should learn from."""
    from tests.runtime.test_outbox import _sample

    from cdcca.runtime.outbox import Outbox

    box = Outbox(tmp_path / "outbox.sqlite")
    box.add_many([_sample(i) for i in range(6)])
    newest = box.pending(2, newest=True)
    assert [s.sample_id for s in newest] == ["dev1-4", "dev1-5"]                 # in the order queued
    box.mark_sent([s.sample_id for s in newest], packet_id="early")
    assert [s.sample_id for s in box.pending()] == [f"dev1-{i}" for i in range(4)]   # for the next round
    box.close()


def test_the_servers_shift_round_asks_each_device_for_its_newest_early_round_samples():
    from cdcca.fleet.server import uplink_ask

    cfg = resolve(sets=["fleet.early_round=20", "fleet.max_samples=256"])
    assert uplink_ask(3, cfg, reacting=True) == {"round": 3, "max-samples": 20, "newest": True}
    assert uplink_ask(4, cfg, reacting=False) == {"round": 4, "max-samples": 256}


def _two_uplinks(device):
    """Two rounds' uplink packets of ``device``, as a busy device queues them."""
    from cdcca.fleet.traffic import serve_round

    serve_round(device, 0)
    first = device.collect_uplink()
    serve_round(device, 1)
    return first, device.collect_uplink()


def test_an_interrupted_round_commits_nothing_and_its_uploads_train_in_the_next_round(tmp_path, device, cloud):
    """A regular round stopped for a shift leaves the cloud as if it had never started: the same update later."""
    from tests.conftest import open_test_cloud

    from cdcca.runtime.protocol import UplinkMessage, cloud_round

    packet, _ = _two_uplinks(device)
    up = {0: UplinkMessage("dev-0", packet, device.status())}
    asked = []
    down = cloud_round(cloud, up, should_stop=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3 and down[0].packets == []              # stopped on its third step: no update
    assert down[0].acked and cloud.pending_samples("dev-0") == len(down[0].acked)   # the uploads stay, acknowledged
    assert cloud.mirror(dev := "dev-0")[0] == 0

    resumed = cloud_round(cloud, up)                              # the next regular round
    never_stopped = open_test_cloud(tmp_path / "other-cloud")
    plain = cloud_round(never_stopped, up)
    assert resumed[0].packets and cloud.pending_samples(dev) == 0
    assert plain[0].packets and cloud.mirror_hash(dev) == never_stopped.mirror_hash(dev)   # no trace of the stop
    never_stopped.close()


def test_a_round_that_reacts_to_a_shift_trains_only_its_own_uploads(device, cloud):
    """What an interrupted round left pending (the old domain) waits for the next regular round."""
    from cdcca.runtime.protocol import UplinkMessage, cloud_round

    old, new = _two_uplinks(device)
    cloud.receive(old)                                            # an interrupted round's uploads
    left = cloud.pending_samples("dev-0")
    trained = {}
    down = cloud_round(cloud, {0: UplinkMessage("dev-0", new, device.status())}, trained=trained, fresh_only=True)
    assert down[0].packets and sorted(trained[0]) == sorted(down[0].acked)
    assert not set(trained[0]) & {s for s in cloud.db.execute("SELECT sample_id FROM samples WHERE round IS NULL")
                                  .fetchall() for s in s}
    assert cloud.pending_samples("dev-0") == left                 # the backlog is still there, untrained
    cloud_round(cloud, {0: UplinkMessage("dev-0", None, device.status())}, trained=trained)
    assert cloud.pending_samples("dev-0") == 0 and len(trained[0]) == left


def test_the_shift_watch_says_so_once_a_device_reports_a_shift_and_stops_with_the_round():
    from cdcca.fleet.server import ShiftWatch

    answers = iter([(40, 0), (41, 0), (44, 1)])
    with ShiftWatch(lambda: next(answers), every_s=0.01) as watch:
        assert watch.reported.wait(5.0)                           # the third question hears the report
    asked = []
    with ShiftWatch(lambda: asked.append(1) or (9, 1), every_s=0.01, active=False) as off:
        pass
    assert not off.reported.is_set() and asked == []             # a shift round is not watched
    calm = []
    with ShiftWatch(lambda: calm.append(1) or (9, 0), every_s=0.01) as quiet:
        quiet.reported.wait(0.1)
    n = len(calm)
    assert n >= 2 and not quiet.reported.is_set()
    quiet.reported.wait(0.05)
    assert len(calm) == n                                         # nothing asked after the block


def test_the_round_a_shift_stopped_hands_its_acknowledgements_to_the_shifts_round_which_starts_at_once(tmp_path):
    """No downlink is spent on a stopped round: the next one, for the shift, carries its acknowledgements."""
    from cdcca.fleet.server import RoundTrigger, merge_acks, with_carried_acks
    from cdcca.runtime.protocol import DownlinkMessage

    asked = []
    trigger = RoundTrigger(resolve(sets=["fleet.min_uploads=64"]), lambda: asked.append(1) or (3, 0), tmp_path / "stop")
    assert trigger.wait(shift_known=True) == "shift" and asked == []      # nothing to ask: the watch heard it
    carried = merge_acks({1: ["a1"]}, {1: ["a2"], 2: ["b1"]})
    assert carried == {1: ["a1", "a2"], 2: ["b1"]}
    shift_round = {1: DownlinkMessage(acked=["a9"], packets=[b"update"], caught_up=True)}
    out = with_carried_acks(shift_round, carried)
    assert out[1] == DownlinkMessage(acked=["a1", "a2", "a9"], packets=[b"update"], caught_up=True)
    assert out[2] == DownlinkMessage(acked=["b1"])                        # a device with nothing else: acks alone
    assert shift_round[1].acked == ["a9"]                                 # the round's own messages stay as they were


def test_a_shift_report_counts_once_its_device_has_something_from_the_new_domain_to_send():
    """Else a device that reported a shift and then got no request would start empty shift rounds forever."""
    from cdcca.fleet.server import tally_queues

    waiting = {"pending": 0, "in_flight": 4, "shift_at": 30, "shift_queued": 0}
    ready = {"pending": 3, "in_flight": 0, "shift_at": 55, "shift_queued": 3}
    older = {"pending": 2, "in_flight": 0, "shift_at": 12}                    # a device without the count
    assert tally_queues([waiting, {"pending": 5}]) == (9, 0)
    assert tally_queues([waiting, ready, older]) == (9, 2)


def test_a_shift_report_starts_a_round_once_half_an_early_round_was_queued_since_it():
    """With rounds of seconds, a round on the first upload after a report trained on 4-5 samples a device and
    its update gained nothing (RESULTS.md, the live fleet with warm ClientApps): wait for half of the newest
    ``fleet.early_round`` samples the shift round takes to come from after the report."""
    from cdcca.fleet.server import tally_queues

    def report(queued: int) -> dict:
        return {"pending": queued, "in_flight": 0, "shift_at": 40, "shift_queued": queued}

    assert tally_queues([report(9)], early_round=20) == (9, 0)
    assert tally_queues([report(10), report(9)], early_round=20) == (19, 1)
    assert tally_queues([report(1)], early_round=1) == (1, 1) and tally_queues([report(1)], early_round=0) == (1, 1)
