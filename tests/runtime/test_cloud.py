"""The cloud runtime (src/cdcca/runtime/cloud.py) on tiny models: its inbox, its rounds, its state dir.
The ``cloud`` and ``device`` fixtures are in conftest.py."""

import json
import shutil

import pytest

from cdcca.akd.config import LabelPhase, Replay
from cdcca.akd.distill import AKDConfig
from cdcca.fleet.traffic import serve_round
from cdcca.runtime import cloud as cloud_mod
from cdcca.runtime.adapter_store import StaleBaseError
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime

FAST_AKD = AKDConfig(labels=LabelPhase(epochs=1, batch_size=4))


def one_round(device, cloud, rnd=0):
    """Serve a round on the device, upload it, and let the cloud answer with an update."""
    serve_round(device, rnd)
    packet = device.collect_uplink()
    device.ack_uplink(cloud.receive(packet))
    return cloud.run_round(device.device_id)


def test_a_round_leaves_device_and_mirror_identical(device, cloud):
    assert device.status()["hash"] == cloud.mirror_hash("dev-0")
    update = one_round(device, cloud)
    report = device.apply(update)
    assert device.status()["version"] == 1
    assert device.status()["hash"] == cloud.mirror_hash("dev-0") == report["hash"]
    assert device.status()["outbox"] == 0


def test_uploads_survive_a_cloud_restart_and_are_not_counted_twice(tmp_path, device):
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=FAST_AKD)
    serve_round(device, 0)
    packet = device.collect_uplink()
    acked = cloud.receive(packet)
    cloud.close()
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=FAST_AKD)     # restarted
    assert cloud.pending_samples("dev-0") == len(acked)
    cloud.receive(packet)                                                    # re-sent after a lost ack
    assert cloud.pending_samples("dev-0") == len(acked)
    assert cloud.run_round("dev-0") is not None
    assert cloud.pending_samples("dev-0") == 0
    assert cloud.run_round("dev-0") is None                                  # nothing new: no update
    cloud.close()


def test_update_for_a_stale_base_is_refused_and_resync_recovers(device, cloud):
    first = one_round(device, cloud)
    second = one_round(device, cloud, rnd=1)               # device never applied the first
    with pytest.raises(StaleBaseError):
        device.apply(second)
    assert device.status()["version"] == 0
    device.apply(cloud.resync("dev-0"))
    assert device.status()["hash"] == cloud.mirror_hash("dev-0")
    assert cloud.update_for("dev-0", 0) == first


def test_receive_builds_no_model(tmp_path, device, monkeypatch):
    """`cdcca cloud receive` only writes the inbox: the teacher and the student stay unbuilt."""
    def no_models(*args):
        raise AssertionError("receive built a model")

    monkeypatch.setattr(cloud_mod, "_build_models", no_models)
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True)
    serve_round(device, 0)
    acked = cloud.receive(device.collect_uplink())
    assert acked and cloud.pending_samples("dev-0") == len(acked)
    cloud.close()


def test_an_uplink_is_decoded_once_by_a_cloud_that_receives_and_trains_it(device, cloud, monkeypatch):
    calls = []
    for name in ("check_uplink", "decode_uplink"):       # receive checks (then builds), a restarted round decodes
        real = getattr(cloud_mod, name)
        monkeypatch.setattr(cloud_mod, name, lambda data, _real=real, _name=name, **kw: calls.append(_name) or _real(data, **kw))
    assert one_round(device, cloud) is not None
    assert calls == ["check_uplink"]


def test_a_moved_state_dir_keeps_working(tmp_path, monkeypatch):
    """Stored paths are relative to the state dir: move both state dirs, run from elsewhere, go on."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    device = DeviceRuntime.create("state/dev", "dev-0", tiny=True)
    cloud = CloudRuntime.open("state/cloud", tiny=True, akd=FAST_AKD)
    first = one_round(device, cloud)
    device.apply(first)
    device.close(), cloud.close()

    shutil.move(tmp_path / "here" / "state", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    device = DeviceRuntime.open(tmp_path / "moved" / "dev")
    cloud = CloudRuntime.open("moved/cloud", akd=FAST_AKD)
    assert cloud.update_for("dev-0", 0) == first              # the stored update is found where it now lies
    device.apply(one_round(device, cloud, rnd=1))
    assert device.status()["version"] == 2 and device.status()["hash"] == cloud.mirror_hash("dev-0")
    device.close(), cloud.close()


def test_an_update_row_written_with_the_old_cwd_relative_path_is_still_found(device, cloud):
    first = one_round(device, cloud)
    cloud.db.execute("UPDATE updates SET path='some/old/cwd/devices/dev-0/update-v1.pkt'")
    assert cloud.update_for("dev-0", 0) == first


def test_records_are_pruned_to_what_a_restore_needs(tmp_path, device):
    """After each round only the records files the current replay buffers name stay on disk."""
    akd = AKDConfig(labels=LabelPhase(epochs=1, batch_size=4), replay=Replay(capacity=1))
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=akd)
    for rnd in range(4):
        device.apply(one_round(device, cloud, rnd))
    folder = tmp_path / "cloud" / "devices" / "dev-0"
    saved = json.loads((folder / "akd-v4.json").read_text())
    wanted = set(saved["replay"]["ids"]) | set(saved["prefix_replay"]["ids"])
    files = sorted(folder.glob("records-r*.safetensors"))
    assert 1 <= len(files) <= len(wanted) <= 2          # 4 rounds wrote 4 files; a restore needs at most 2
    cloud.close()
    restarted = CloudRuntime.open(tmp_path / "cloud", akd=akd)
    device.apply(one_round(device, restarted, rnd=4))           # the restore finds every record it needs
    assert device.status()["hash"] == restarted.mirror_hash("dev-0")
    restarted.close()



def test_uploads_in_a_pca_code_confine_the_rounds_token_projection_change_to_the_codes_span():
    import torch

    base = {"bridge.token_norm.weight": torch.ones(1280).half()}
    assert cloud_mod.code_span(base, "full-int8") is None
    a, b = cloud_mod.code_span(base, "pca256-ec")
    assert a.shape == (1280, 256) and b.shape == (256, 1280)
