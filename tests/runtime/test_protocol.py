"""The steps of one round (cdcca.runtime.protocol), each on its own: what the cloud answers a device in sync,
behind, or lost, and what a device does with a packet on a stale base."""

import pytest

from cdcca.fleet.traffic import serve_round
from cdcca.runtime.adapter_store import StaleBaseError
from cdcca.runtime.protocol import DownlinkMessage, UplinkMessage, cloud_downlink, device_apply, device_uplink, run_round


class FakeCloud:
    """The CloudRuntime calls the cloud step makes; the mirror is at version 2."""

    def __init__(self, stored=None, new=b"update 2->3"):
        self.stored, self.new = stored or {}, new

    def receive(self, packet):
        return ["s1", "s2"]

    def mirror_hash(self, device_id):
        return "h2"

    def update_for(self, device_id, version):
        return self.stored.get(version)

    def resync(self, device_id):
        return b"resync v2"

    def run_round(self, device_id, study=None, only=None, should_stop=None):
        return self.new


def uplink(version, hash_, packet=b"uplink"):
    return UplinkMessage(device_id="dev-1", packet=packet, status={"version": version, "hash": hash_})


def test_a_device_in_sync_gets_acks_and_its_new_update():
    down = cloud_downlink(FakeCloud(), uplink(2, "h2"))
    assert down == DownlinkMessage(acked=["s1", "s2"], packets=[b"update 2->3"], caught_up=False)


def test_a_device_that_missed_an_update_gets_it_replayed_first():
    down = cloud_downlink(FakeCloud(stored={1: b"update 1->2"}), uplink(1, "h1"))
    assert down.packets == [b"update 1->2", b"update 2->3"] and down.caught_up


def test_a_device_with_no_stored_update_for_its_version_gets_a_resync():
    down = cloud_downlink(FakeCloud(new=None), uplink(0, "h0", packet=None))
    assert down == DownlinkMessage(acked=[], packets=[b"resync v2"], caught_up=True)


class FakeDevice:
    device_id = "dev-1"

    def __init__(self):
        self.acked, self.seen = [], []

    def ack_uplink(self, ids):
        self.acked += ids

    def apply(self, packet):
        self.seen.append(packet)
        if packet == b"stale":
            raise StaleBaseError("update base v1 is not the device's v2")
        return {"status": "applied"}

    def status(self):
        return {"version": 2, "hash": "h2"}


def test_a_device_acks_then_applies_in_order_and_stops_at_a_stale_base():
    dev = FakeDevice()
    report = device_apply(dev, DownlinkMessage(acked=["s1"], packets=[b"u1", b"stale", b"u3"]))
    assert dev.acked == ["s1"] and dev.seen == [b"u1", b"stale"]
    assert report.applied == ["applied"] and "v1" in report.resync_reason


def test_one_round_in_process_resyncs_a_device_on_a_stale_base():
    class StaleOnce(FakeDevice):
        def apply(self, packet):
            if packet == b"update 2->3":
                self.seen.append(packet)
                raise StaleBaseError("stale")
            return super().apply(packet)

        def collect_uplink(self, max_samples, newest=False):
            return b"uplink"

        class outbox:
            @staticmethod
            def requeue():
                return 0

    dev = StaleOnce()
    up, down, report = run_round(dev, FakeCloud(), 0)
    assert up.packet == b"uplink" and down.packets == [b"update 2->3"]
    assert dev.seen == [b"update 2->3", b"resync v2"] and report.resync_reason is None


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (str, int, float, bool, bytes)


def test_a_real_uplink_carries_only_plain_values(tmp_path):
    """What any transport must carry: bytes, strings, numbers — checked on a real device's message."""
    import dataclasses

    from cdcca.runtime.device import DeviceRuntime

    dev = DeviceRuntime.create(tmp_path / "dev", "dev-1", tiny=True)
    serve_round(dev, 0)
    up = device_uplink(dev, 0, served={"round": 0, "online_mc": 0.5})
    assert up.packet and _plain(dataclasses.asdict(up))
    assert not _plain({"tensor": object()})          # the check itself can fail
    dev.close()
    with pytest.raises(TypeError):
        DownlinkMessage()


def test_the_uplink_holds_exactly_what_the_outbox_held_and_serves_nothing(tmp_path, monkeypatch):
    """A device fed only by its own requests (API, file): the round packs those samples and never
    answers a synthetic stream."""
    import torch

    from cdcca.fleet.traffic import SimulatedTraffic
    from cdcca.runtime.device import DeviceRuntime
    from cdcca.uplink import decode_uplink

    dev = DeviceRuntime.create(tmp_path / "dev", "dev-1", tiny=True)
    ids = [f"api-{i}" for i in range(6)]
    _, queued = dev.answer_and_queue(torch.randn(6, 49, 32), ["what color is the shape?"] * 6, ids)
    assert queued and queued <= set(ids)

    def no_serving(*_a, **_k):
        raise AssertionError("a round must not answer requests")

    monkeypatch.setattr(DeviceRuntime, "answer_and_queue", no_serving)
    monkeypatch.setattr(SimulatedTraffic, "chunk", no_serving)
    up = device_uplink(dev, 7)
    assert set(decode_uplink(up.packet).sample_ids) == queued and up.served == {}
    dev.ack_uplink(sorted(queued))
    assert device_uplink(dev, 8).packet is None          # acknowledged: nothing left to send
    dev.close()


@pytest.mark.parametrize("group", [None, "all"])
def test_the_fleet_load_benchmark_loses_and_duplicates_nothing(group):
    from cdcca.bench.fleet import run_bench

    res = run_bench(devices=3, rounds=2, per_round=4, group=group)
    assert res["uploads"] == 3 * 2 * 4 and res["group"] == group
    assert res["lost_uploads"] == 0 and res["duplicated_uploads"] == 0
    assert res["devices_in_sync_with_their_mirror"] == 3 and res["ack_ms_p99"] >= res["ack_ms_p50"] > 0
