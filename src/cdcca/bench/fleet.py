"""``cdcca bench fleet``: the cloud runtime under N devices for R rounds, measured for load and loss.

Every device runs the round protocol (:mod:`cdcca.runtime.protocol`) against one cloud runtime, as the
embedded fleet does (every uplink committed, then the cloud's step for each device), on tiny random models (transport and bookkeeping, not accuracy). Reported:
uploads accepted per second by ``CloudRuntime.receive``, p50/p99 time from an uplink packet's
arrival to its acknowledgement, cloud seconds per round (all devices), and the two numbers that must
be 0: uploads lost (sent but never stored, or still in a device's outbox at the end) and uploads
trained twice. With ``--group`` every device joins one fleet group: one student trains per round
instead of one per device.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from cdcca.config import RunConfig
from cdcca.downlink import DWCConfig
from cdcca.fleet.local import LocalFleet
from cdcca.metrics import latency_ms
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime


def run_bench(devices: int, rounds: int, per_round: int = 8, group: str | None = None, log=None) -> dict:
    """``group``: a fleet group name every device joins (one shared student), or None (one student each)."""

    with tempfile.TemporaryDirectory(prefix="cdcca-fleet-bench-") as tmp:
        root = Path(tmp)
        cloud = CloudRuntime.open(root / "cloud", tiny=True, dwc=DWCConfig(budget_bytes=16 * 1024))
        devs = [DeviceRuntime.create(root / f"dev-{i}", f"dev-{i}", tiny=True,
                                     stream={"index": i, "n_devices": devices, "per_round": per_round})
                for i in range(devices)]
        for dev in devs:
            cloud.set_group(dev.device_id, group)
        fleet = LocalFleet(RunConfig(), root, devs, cloud)          # the embedded fleet's round, on every device
        uploads = 0
        t_start = time.perf_counter()
        try:
            for rnd in range(rounds):
                uploads += sum(r["uploads"] for r in fleet.run_round(rnd))
                if log:
                    log(f"round {rnd + 1}/{rounds}: {uploads} uploads stored, cloud {fleet.cloud_s[-1]:.1f} s")
            stored = {r[0] for r in cloud.db.execute("SELECT sample_id FROM samples")}
            sent = set(fleet.acked)
            left_on_devices = sum(d.status()["outbox"] for d in devs)
            in_sync = sum(d.status()["hash"] == cloud.mirror_hash(d.device_id) for d in devs)
        finally:
            fleet.close()
    ack, trained = latency_ms(fleet.receive_s, 2), fleet.trained
    return {"devices": devices, "rounds": rounds, "group": group, "requests_per_device_round": per_round, "uploads": uploads,
            "uploads_accepted_per_s": round(uploads / sum(fleet.receive_s), 1),
            "ack_ms_p50": ack["p50_ms"], "ack_ms_p99": ack["p99_ms"],
            "cloud_s_per_round_median": round(float(np.median(fleet.cloud_s)), 2),
            "cloud_s_per_device_round": round(sum(fleet.cloud_s) / (devices * rounds), 3),
            "lost_uploads": len(sent - stored) + left_on_devices, "duplicated_uploads": len(trained) - len(set(trained)),
            "devices_in_sync_with_their_mirror": in_sync, "wall_s": round(time.perf_counter() - t_start, 1)}
