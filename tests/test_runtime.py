"""Device and cloud runtimes on tiny models: the packets, the stores and their crash-safety rules."""

import pytest

from cdcca.akd.distill import AKDConfig
from cdcca.downlink import DWCConfig
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime

FAST_AKD = AKDConfig(epochs=1, batch_size=4)


@pytest.fixture
def cloud(tmp_path):
    c = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=FAST_AKD, dwc=DWCConfig(budget_bytes=16 * 1024))
    yield c
    c.close()


@pytest.fixture
def device(tmp_path):
    d = DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True)
    yield d
    d.close()


def one_round(device, cloud, rnd=0):
    device.serve_round(rnd)
    packet = device.collect_uplink()
    device.ack_uplink(cloud.receive(packet))
    return cloud.run_round(device.device_id)


def test_an_update_applied_twice_changes_nothing(device, cloud):
    update = one_round(device, cloud)
    device.apply(update)
    assert device.apply(update)["status"] == "already_applied"
    assert device.status()["version"] == 1


def test_rollback_returns_to_a_kept_version(device, cloud):
    v0 = device.status()["hash"]
    device.apply(one_round(device, cloud))
    device.rollback(0)
    assert device.status()["hash"] == v0


def test_device_state_reopens_after_a_restart(tmp_path, device, cloud):
    device.apply(one_round(device, cloud))
    device.serve_round(1)
    status = device.status()
    device.close()
    again = DeviceRuntime.open(tmp_path / "dev")
    assert again.status()["hash"] == status["hash"] and again.status()["outbox"] == status["outbox"]
    again.close()


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.pop("device_id"), "device_id"), (lambda c: c.update(uts={"nope": 1}), "uts"),
    (lambda c: c.update(bytes_up="many"), "bytes_up"), (lambda c: c.update(stream=[]), "stream"),
])
def test_a_damaged_device_config_is_a_one_line_error(tmp_path, edit, field):
    """Found by fuzzing the device state: a device.json without device_id once raised KeyError."""
    import json

    DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True).close()
    cfg = json.loads((tmp_path / "dev" / "device.json").read_text())
    edit(cfg)
    (tmp_path / "dev" / "device.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field) as err:
        DeviceRuntime.open(tmp_path / "dev")
    assert "\n" not in str(err.value) and "re-create" in str(err.value)
