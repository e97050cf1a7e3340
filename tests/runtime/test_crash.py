"""SIGKILL in the middle of a cloud round or a device apply: nothing acknowledged is lost, nothing applied twice.

The killed process is a real child process (tiny models); the test pauses it at the worst moment
— after the round's files are written but before its transaction commits, or after the new
adapter version is written but before it is renamed into place — and kills it with SIGKILL.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cdcca.akd.config import LabelPhase
from cdcca.akd.distill import AKDConfig
from cdcca.fleet.traffic import serve_round
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime

pytestmark = pytest.mark.integration
FAST_AKD = AKDConfig(labels=LabelPhase(epochs=1, batch_size=4))
SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_until_paused(script: str, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, start_new_session=True)
    deadline = time.time() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode} before reaching the pause point")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("child never reached the pause point")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


def test_cloud_killed_mid_round_loses_no_upload_and_the_next_round_completes(tmp_path):
    device = DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True)
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=FAST_AKD)
    serve_round(device, 0)
    acked = cloud.receive(device.collect_uplink())
    device.ack_uplink(acked)
    cloud.close()
    marker = tmp_path / "paused"
    run_until_paused(f"""
        import time, torch
        torch.set_num_threads(1)
        import cdcca.runtime.cloud as c
        from cdcca.akd.config import LabelPhase
        from cdcca.akd.distill import AKDConfig
        real = c.write_packet
        def pause_after_update_file(path, data):
            real(path, data)
            open({str(marker)!r}, "w").close()          # files written, transaction not committed
            time.sleep(600)
        c.write_packet = pause_after_update_file
        c.CloudRuntime.open({str(tmp_path / "cloud")!r}, tiny=True, akd=AKDConfig(labels=LabelPhase(epochs=1, batch_size=4))).run_round("dev-0")
    """, marker)
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=FAST_AKD)
    assert cloud.pending_samples("dev-0") == len(acked)           # nothing acknowledged was lost
    assert cloud.mirror("dev-0")[0] == 0                            # the half-done round left no trace
    update = cloud.run_round("dev-0")
    device.apply(update)
    assert device.status()["hash"] == cloud.mirror_hash("dev-0")
    assert device.apply(update)["status"] == "already_applied"    # never applied twice
    cloud.close()
    device.close()


def test_device_killed_while_applying_keeps_a_loadable_version(tmp_path):
    device = DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True)
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=FAST_AKD)
    serve_round(device, 0)
    device.ack_uplink(cloud.receive(device.collect_uplink()))
    update = cloud.run_round("dev-0")
    (tmp_path / "update.pkt").write_bytes(update)
    v0 = device.status()["hash"]
    device.close()
    marker = tmp_path / "paused"
    run_until_paused(f"""
        import os, time, torch
        torch.set_num_threads(1)
        real = os.replace
        def pause_before_rename(src, dst):
            if str(dst).endswith(".safetensors"):
                open({str(marker)!r}, "w").close()       # new version written to a temp file, not renamed
                time.sleep(600)
            return real(src, dst)
        from cdcca.runtime.device import DeviceRuntime
        dev = DeviceRuntime.open({str(tmp_path / "dev")!r})
        os.replace = pause_before_rename
        dev.apply(open({str(tmp_path / "update.pkt")!r}, "rb").read())
    """, marker)
    device = DeviceRuntime.open(tmp_path / "dev")
    assert device.status()["version"] == 0 and device.status()["hash"] == v0
    device.apply(update)
    assert device.status()["hash"] == cloud.mirror_hash("dev-0")
    assert device.apply(update)["status"] == "already_applied"
    cloud.close()
    device.close()
