"""A cloud killed between two rounds and restarted sends the same next update, bit for bit, as one
that kept running: AKD's replay buffers and aligner are durable with the mirror (tiny models).

Packets carry a creation time, so two packets are compared by what they carry: every delta tensor
(through its hash) and the adapter hash the device must reach."""

import shutil

import pytest
import torch
from tests.runtime.test_crash import run_until_paused

from cdcca.adapter_state import state_hash
from cdcca.akd.config import LabelPhase, PrefixPhase, Replay
from cdcca.akd.distill import AKDConfig
from cdcca.downlink import decode_update
from cdcca.fleet.traffic import serve_round
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime
from cdcca.wire import decode

pytestmark = pytest.mark.integration
# both phases on, replay on: every piece of per-device state shapes the next update
AKD = AKDConfig(labels=LabelPhase(epochs=1, batch_size=4), prefix=PrefixPhase(epochs=2, batch_size=4), replay=Replay(per_round=1.0))


def one_round(device: DeviceRuntime, cloud: CloudRuntime, rnd: int) -> tuple[str, str]:
    """Serve, upload, distil, apply; returns (hash of the update's delta, adapter hash reached)."""
    serve_round(device, rnd)
    device.ack_uplink(cloud.receive(device.collect_uplink()))
    update = cloud.run_round("dev-0")
    device.apply(update)
    packet = decode(update, expect_kind="update")
    return state_hash(decode_update(packet)), packet.meta["result_hash"]


def uninterrupted(root) -> list[tuple[str, str]]:
    device = DeviceRuntime.create(root / "dev", "dev-0", tiny=True)
    cloud = CloudRuntime.open(root / "cloud", tiny=True, akd=AKD)
    updates = [one_round(device, cloud, r) for r in range(3)]
    cloud.close()
    device.close()
    return updates


def killed_after_two_rounds(root) -> None:
    """Rounds 0 and 1 in a child process that is then SIGKILLed (not closed)."""
    marker = root / "paused"
    run_until_paused(f"""
        import time, torch
        torch.set_num_threads({torch.get_num_threads()})   # as this test process: reductions depend on it
        from cdcca.runtime.cloud import CloudRuntime
        from cdcca.runtime.device import DeviceRuntime
        from cdcca.akd.config import AKDConfig, LabelPhase, PrefixPhase, Replay
        from cdcca.fleet.traffic import serve_round
        akd = AKDConfig(labels=LabelPhase(epochs=1, batch_size=4), prefix=PrefixPhase(epochs=2, batch_size=4), replay=Replay(per_round=1.0))
        device = DeviceRuntime.create({str(root / "dev")!r}, "dev-0", tiny=True)
        cloud = CloudRuntime.open({str(root / "cloud")!r}, tiny=True, akd=akd)
        for r in range(2):
            serve_round(device, r)
            device.ack_uplink(cloud.receive(device.collect_uplink()))
            device.apply(cloud.run_round("dev-0"))
        open({str(marker)!r}, "w").close()
        time.sleep(600)
    """, marker)


def test_a_restarted_cloud_continues_bit_identically(tmp_path):
    reference = uninterrupted(tmp_path / "a")
    killed_after_two_rounds(tmp_path / "b")
    shutil.copytree(tmp_path / "b", tmp_path / "c")      # the same state, to show what the saved AKD state is worth
    device = DeviceRuntime.open(tmp_path / "b" / "dev")
    cloud = CloudRuntime.open(tmp_path / "b" / "cloud", tiny=True, akd=AKD)
    assert cloud.mirror("dev-0")[0] == 2
    assert one_round(device, cloud, 2) == reference[2]
    cloud.close()
    device.close()

    for f in (tmp_path / "c" / "cloud" / "devices" / "dev-0").glob("akd-v*.json"):
        f.unlink()                                        # a cloud that forgot its replay buffers …
    device = DeviceRuntime.open(tmp_path / "c" / "dev")
    cloud = CloudRuntime.open(tmp_path / "c" / "cloud", tiny=True, akd=AKD)
    assert one_round(device, cloud, 2) != reference[2]  # … sends a different update
    cloud.close()
    device.close()
