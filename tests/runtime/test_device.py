"""The device runtime (src/cdcca/runtime/device.py) on tiny models: its state dir, the updates it applies,
its rollback and its configuration. The ``cloud`` and ``device`` fixtures are in conftest.py."""

import json

import pytest
from tests.runtime.test_cloud import one_round

from cdcca.fleet.traffic import serve_round
from cdcca.runtime.device import DeviceRuntime
from cdcca.uplink import UTSConfig, decode_uplink


def test_a_round_queues_the_uts_budget_of_its_requests_in_the_outbox_until_acknowledged(tmp_path):
    uts = UTSConfig(selection="budget", budget=3, token_scorer="energy")
    device = DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True, uts=uts)
    served = serve_round(device, 0)
    assert served["requests"] > 3 and served["outbox"] == 3              # the 3 most uncertain requests
    packet = device.collect_uplink()
    assert packet is not None and device.collect_uplink() is None         # in flight: not sent twice
    assert device.status()["outbox"] == device.status()["outbox_in_flight"] == 3
    assert device.ack_uplink(list(decode_uplink(packet).sample_ids)) == 3   # what the cloud acknowledges
    assert device.status()["outbox"] == 0
    device.close()


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
    serve_round(device, 1)
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
    DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True).close()
    cfg = json.loads((tmp_path / "dev" / "device.json").read_text())
    edit(cfg)
    (tmp_path / "dev" / "device.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field) as err:
        DeviceRuntime.open(tmp_path / "dev")
    assert "\n" not in str(err.value) and "re-create" in str(err.value)


def test_a_device_with_the_view_consistency_scorer_serves_its_round(tmp_path):
    """The device passes its own model and prompter to the two-view scorer, so a run may choose it."""
    uts = UTSConfig(selection="budget", budget=4, token_scorer="energy", sample_scorer="view_consistency")
    device = DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True, uts=uts)
    assert serve_round(device, 0)["outbox"] == 4
