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

from cdcca.akd.distill import AKDConfig
from cdcca.downlink import DWCConfig
from cdcca.metrics import latency_ms
from cdcca.runtime import protocol
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime


def run_bench(devices: int, rounds: int, per_round: int = 8, group: str | None = None, log=None) -> dict:
    """``group``: a fleet group name every device joins (one shared student), or None (one student each)."""

    with tempfile.TemporaryDirectory(prefix="cdcca-fleet-bench-") as tmp:
        root = Path(tmp)
        cloud = CloudRuntime.open(root / "cloud", tiny=True, akd=AKDConfig(), dwc=DWCConfig(budget_bytes=16 * 1024))
        devs = [DeviceRuntime.create(root / f"dev-{i}", f"dev-{i}", tiny=True,
                                     stream={"index": i, "n_devices": devices, "per_round": per_round})
                for i in range(devices)]
        for dev in devs:
            cloud.set_group(dev.device_id, group)
        sent: set[str] = set()
        trained: list[str] = []
        ack_s, cloud_round_s = [], []
        t_start = time.perf_counter()
        try:
            for rnd in range(rounds):
                acks = {}
                for dev in devs:                           # every uplink is committed before any training
                    dev.serve_round(rnd)           # the simulated traffic fills the outbox
                    up = protocol.device_uplink(dev, rnd)
                    if up.packet is None:
                        continue
                    t0 = time.perf_counter()
                    acks[dev.device_id] = cloud.receive(up.packet)
                    ack_s.append(time.perf_counter() - t0)
                    sent.update(acks[dev.device_id])
                t_round = 0.0
                for dev in devs:
                    t0 = time.perf_counter()
                    update = cloud.run_round(dev.device_id)
                    t_round += time.perf_counter() - t0
                    if cloud.last_round is not None:
                        trained += cloud.last_round.sample_ids
                    down = protocol.DownlinkMessage(acked=acks.get(dev.device_id, []), packets=[update] if update else [])
                    protocol.deliver(dev, cloud, rnd, down, protocol.DelayedLink(0))
                cloud_round_s.append(t_round)
                if log:
                    log(f"round {rnd + 1}/{rounds}: {len(sent)} uploads stored, cloud {t_round:.1f} s")
            stored = {r[0] for r in cloud.db.execute("SELECT sample_id FROM samples")}
            left_on_devices = sum(d.status()["outbox"] for d in devs)
            in_sync = sum(d.status()["hash"] == cloud.mirror_hash(d.device_id) for d in devs)
        finally:
            for d in devs:
                d.close()
            cloud.close()
    ack = latency_ms(ack_s, 2)
    return {"devices": devices, "rounds": rounds, "group": group, "requests_per_device_round": per_round, "uploads": len(sent),
            "uploads_accepted_per_s": round(len(sent) / sum(ack_s), 1),
            "ack_ms_p50": ack["p50_ms"], "ack_ms_p99": ack["p99_ms"],
            "cloud_s_per_round_median": round(float(np.median(cloud_round_s)), 2),
            "cloud_s_per_device_round": round(sum(cloud_round_s) / (devices * rounds), 3),
            "lost_uploads": len(sent - stored) + left_on_devices, "duplicated_uploads": len(trained) - len(set(trained)),
            "devices_in_sync_with_their_mirror": in_sync, "wall_s": round(time.perf_counter() - t_start, 1)}
