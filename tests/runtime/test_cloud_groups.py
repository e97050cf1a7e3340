"""Fleet groups on tiny models: devices of one group share one student. The cloud pools the group's
uploads, trains once per round, and sends every member the same compressed update against its own
mirror; a member that joined late or missed a round is brought to the group's mirror by a resync."""

from dataclasses import replace

import pytest
import torch

from cdcca import wire
from cdcca.akd.config import LabelPhase
from cdcca.akd.distill import AKDConfig
from cdcca.config import resolve
from cdcca.downlink import DWCConfig
from cdcca.fleet.local import LocalFleet
from cdcca.fleet.traffic import serve_round
from cdcca.runtime import protocol
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime
from cdcca.uplink import UTSConfig, decode_uplink

FAST_AKD = AKDConfig(labels=LabelPhase(epochs=1, batch_size=4))
STREAM = {"stream": "default", "scenario": "persistent", "rounds_per_domain": 1, "seed": 0, "per_round": 8}


@pytest.fixture
def cloud(tmp_path):
    c = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=FAST_AKD, dwc=DWCConfig(budget_bytes=16 * 1024))
    yield c
    c.close()


def make_device(tmp_path, name: str, index: int, n: int = 3) -> DeviceRuntime:
    return DeviceRuntime.create(tmp_path / name, name, tiny=True, stream={**STREAM, "index": index, "n_devices": n},
                                uts=UTSConfig(selection="budget", budget=4, token_scorer="energy"))


def fleet_round(cloud, devices, rnd):
    """One round for ``devices`` the way every driver runs it: all uplinks, the cloud, all applies."""
    for d in devices:
        serve_round(d, rnd)                 # the simulated traffic; the round only moves the outbox
    ups = {d.device_id: protocol.device_uplink(d, rnd) for d in devices}
    downs = protocol.cloud_round(cloud, ups)
    for d in devices:
        report = protocol.device_apply(d, downs[d.device_id])
        assert report.resync_reason is None
        assert d.status()["hash"] == cloud.mirror_hash(d.device_id)
    return ups, downs


def test_a_group_trains_one_student_on_all_members_uploads_and_sends_each_the_same_update(tmp_path, cloud):
    devices = [make_device(tmp_path, f"cam-{i}", i) for i in range(3)]
    for d in devices:
        cloud.set_group(d.device_id, "site-a")
    ups, downs = fleet_round(cloud, devices, 0)

    uploaded = sum(len(decode_uplink(u.packet).sample_ids) for u in ups.values())
    (group_round,) = cloud.metrics("@site-a")                          # one training for three devices
    assert group_round["uploads"] == uploaded == 12
    packets = [wire.decode(downs[d.device_id].packets[-1]) for d in devices]
    for d, pkt in zip(devices, packets):
        assert pkt.meta["device_id"] == d.device_id and pkt.meta["new_version"] == "1"
        assert cloud.metrics(d.device_id)[-1]["delivered"] == "update"
    assert all(torch.equal(packets[0].tensors[k], p.tensors[k]) for p in packets[1:] for k in packets[0].tensors)
    assert len({d.status()["hash"] for d in devices}) == 1 and devices[0].status()["hash"] == cloud.mirror_hash("@site-a")
    assert cloud.pending_samples(*[d.device_id for d in devices]) == 0


def test_a_device_that_joins_late_is_resynced_to_the_group_then_follows_its_updates(tmp_path, cloud):
    early = [make_device(tmp_path, f"cam-{i}", i) for i in range(2)]
    for d in early:
        cloud.set_group(d.device_id, "site-a")
    fleet_round(cloud, early, 0)
    late = make_device(tmp_path, "cam-2", 2)
    cloud.set_group("cam-2", "site-a")
    fleet_round(cloud, early + [late], 1)
    assert cloud.metrics("cam-2")[-1]["delivered"] == "resync"      # it was at v0, the group's update was from v1
    fleet_round(cloud, early + [late], 2)
    assert cloud.metrics("cam-2")[-1]["delivered"] == "update"
    assert len(cloud.metrics("@site-a")) == 3


def test_a_member_that_vanishes_for_a_round_is_brought_back_in_sync(tmp_path, cloud):
    devices = [make_device(tmp_path, f"cam-{i}", i) for i in range(2)]
    for d in devices:
        cloud.set_group(d.device_id, "site-a")
    fleet_round(cloud, devices, 0)
    fleet_round(cloud, devices[:1], 1)                               # cam-1 is offline this round
    assert cloud.mirror_hash("cam-1") != cloud.mirror_hash("@site-a")
    fleet_round(cloud, devices, 2)
    assert devices[1].status()["hash"] == cloud.mirror_hash("@site-a")


def test_a_device_that_leaves_its_group_trains_its_own_student_from_where_it_is(tmp_path, cloud):
    device = make_device(tmp_path, "cam-0", 0, n=1)
    cloud.set_group("cam-0", "site-a")
    fleet_round(cloud, [device], 0)
    cloud.set_group("cam-0", None)
    before = device.status()["version"]
    fleet_round(cloud, [device], 1)
    assert cloud.metrics("cam-0")[-1]["samples"] > 0 and "delivered" not in cloud.metrics("cam-0")[-1]
    assert device.status()["version"] == before + 1 and len(cloud.metrics("@site-a")) == 1


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65, "dév"])
def test_names_that_are_not_plain_are_refused_before_anything_is_written(tmp_path, cloud, name):
    device = make_device(tmp_path, "cam-0", 0, n=1)
    serve_round(device, 0)
    pkt = wire.decode(device.collect_uplink())
    forged = wire.encode("uplink", pkt.tensors, {**pkt.meta, "device_id": name})
    with pytest.raises(wire.PacketError, match="device_id"):
        cloud.receive(forged)
    with pytest.raises(ValueError, match="plain name"):
        cloud.set_group("cam-0", name)
    with pytest.raises(ValueError, match="plain name"):
        cloud.set_group(name, "site-a")
    assert not (tmp_path / "escape").exists() and sorted(p.name for p in (tmp_path / "cloud" / "devices").glob("*")) == []
    with pytest.raises(ValueError, match="plain name"):
        DeviceRuntime.create(tmp_path / "bad", name, tiny=True)


def test_the_embedded_fleet_with_one_group_trains_once_per_round(tmp_path):
    cfg = replace(resolve("tiny", sets=["fleet.devices=3", "fleet.group=all", "uts.budget=4"]), akd=FAST_AKD)
    fleet = LocalFleet.setup(cfg, tmp_path)
    rows = fleet.run_round(0) + fleet.run_round(1)
    assert [r["version"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert len(fleet.cloud.metrics("@all")) == 2
    trained = [r for r in rows if r["cloud_s"] > 0]
    assert sum(r["uploads"] for r in rows) == 2 * 3 * 4 and trained
    fleet.close()
    with pytest.raises(ValueError, match="group must be 'all'"):
        LocalFleet.setup(resolve("tiny", sets=["fleet.group=site"]), tmp_path / "other")


def test_the_upload_budget_is_per_device_like_the_round_size(tmp_path):
    cfg = replace(resolve("tiny", sets=["fleet.devices=2", "uts.budget=3"]), akd=FAST_AKD)
    fleet = LocalFleet.setup(cfg, tmp_path)
    rows = fleet.run_round(0)
    fleet.close()
    assert [r["uploads"] for r in rows] == [3, 3]
