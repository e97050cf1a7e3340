"""The embedded fleet: N device runtimes and one cloud runtime in one process, no network.

It runs the steps of :mod:`cdcca.protocol` — the same functions the Flower apps call — through the
same runtimes, moving the same packets, so what the demo measures is what a deployment would do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from cdcca import protocol
from cdcca.cloud import CloudRuntime
from cdcca.data.stream import Domain, resolve_sequence
from cdcca.device import DeviceRuntime
from cdcca.distill import AKDConfig
from cdcca.downlink import DWCConfig
from cdcca.uplink import UTSConfig


@dataclass
class FleetConfig:
    devices: int = 1
    stream: str = "default"
    per_domain: int = 160          # requests per domain, split across devices
    rounds_per_domain: int = 1
    heldout_n: int = 200           # held-out questions per domain for the final accuracy
    curve_n: int | None = None     # ... for the curves of the rounds before the last (None: heldout_n)
    uts: UTSConfig = field(default_factory=lambda: UTSConfig(selection="budget", budget=64))
    akd: AKDConfig = field(default_factory=AKDConfig)
    dwc: DWCConfig = field(default_factory=DWCConfig)
    tiny: bool = False
    seed: int = 0
    group: str | None = None       # "all": every device in one fleet group sharing one student

    @property
    def rounds(self) -> int:
        return len(resolve_sequence(self.stream)) * self.rounds_per_domain

    def device_uts(self) -> UTSConfig:
        """Each device's uplink settings. The preset's upload budget is the whole fleet's per round (its
        requests are split across the devices too), so with N devices each uploads budget / N: the same
        share of its requests, the same uplink in all, whatever N is — and a group pools one device's worth."""
        if self.uts.selection != "budget" or self.devices == 1:
            return self.uts
        return replace(self.uts, budget=max(1, round(self.uts.budget / self.devices)))


FLEET_PRESETS = {
    # one round per domain of the default stream, as in `cdcca bench akd`: 320 requests, the 128 most
    # uncertain uploaded, of which AKD keeps those the teacher is sure of
    # (15 prefix epochs instead of AKD's 20: 30 s less per run for −0.7 points on seed 0, docs/RESULTS.md §0.6)
    "quick": dict(per_domain=320, heldout_n=200, curve_n=100, uts=UTSConfig(selection="budget", budget=128),
                  akd=AKDConfig(prefix_epochs=15)),
    "paper": dict(per_domain=640, rounds_per_domain=2, heldout_n=1000, uts=UTSConfig(selection="budget", budget=160)),
    "tiny": dict(per_domain=16, heldout_n=16, tiny=True, uts=UTSConfig(selection="budget", budget=4, token_scorer="energy")),
}


class LocalFleet:
    def __init__(self, cfg: FleetConfig, out_dir: Path, devices: list[DeviceRuntime], cloud: CloudRuntime):
        self.cfg, self.out, self.devices, self.cloud = cfg, out_dir, devices, cloud
        self.history: list[dict] = []

    @classmethod
    def setup(cls, cfg: FleetConfig, out_dir: Path) -> LocalFleet:
        out_dir = Path(out_dir)
        from cdcca.data.stream import stream_candidates

        cloud = CloudRuntime.open(out_dir / "cloud", tiny=cfg.tiny, akd=cfg.akd, dwc=cfg.dwc,
                                  candidates=None if cfg.tiny else stream_candidates(cfg.stream))
        if cfg.group not in (None, "all"):
            raise ValueError(f"group must be 'all' (one fleet group) or unset (a student per device), got {cfg.group!r}")
        devices = []
        for i in range(cfg.devices):
            d = out_dir / "devices" / f"dev-{i}"
            stream = {"index": i, "n_devices": cfg.devices, "stream": cfg.stream, "per_domain": cfg.per_domain,
                      "rounds_per_domain": cfg.rounds_per_domain, "seed": cfg.seed, "per_round": 8}
            if (d / "device.json").exists():
                devices.append(DeviceRuntime.open(d))
            else:
                devices.append(DeviceRuntime.create(d, f"dev-{i}", tiny=cfg.tiny, uts=cfg.device_uts(), stream=stream))
            cloud.set_group(f"dev-{i}", cfg.group)
        return cls(cfg, out_dir, devices, cloud)

    def run_round(self, rnd: int, evaluate=None) -> list[dict]:
        """One round of :mod:`cdcca.protocol` for the whole fleet: every device's uplink, the cloud's
        step for all of them (uploads committed before any training, so a group learns from all its
        members), every device's apply (and resync if needed); then an optional evaluation."""
        t0 = time.perf_counter()
        befores = {dev.device_id: dev.status() for dev in self.devices}
        ups = {dev.device_id: protocol.device_uplink(dev, rnd) for dev in self.devices}
        cloud_s: dict[str, float] = {}
        downs = protocol.cloud_round(self.cloud, ups, timing=cloud_s)
        rows = []
        for dev in self.devices:
            up, before = ups[dev.device_id], befores[dev.device_id]
            report = protocol.device_apply(dev, downs[dev.device_id])
            if report.resync_reason is not None:
                report = protocol.device_apply(dev, protocol.cloud_resync(self.cloud, dev.device_id))
            after = report.status
            assert after["hash"] == self.cloud.mirror_hash(dev.device_id), "device and cloud mirror diverged"
            row = {"round": rnd, "device": dev.device_id, "domain": up.served["domain"], "online_mc": up.served["online_mc"],
                   "uploads": len(downs[dev.device_id].acked),
                   "bytes_up": after["bytes_up"] - before["bytes_up"], "bytes_down": after["bytes_down"] - before["bytes_down"],
                   "version": after["version"], "cloud_s": round(cloud_s[dev.device_id], 2)}
            rows.append(row)
        wall = round(time.perf_counter() - t0, 2)
        for dev, row in zip(self.devices, rows):
            row["wall_s"] = wall          # the whole fleet's round (devices and cloud take turns)
            if evaluate is not None:
                t_eval = time.perf_counter()
                row.update(evaluate(dev, rnd))
                row["eval_s"] = round(time.perf_counter() - t_eval, 2)
        self.history += rows
        return rows

    def close(self) -> None:
        for d in self.devices:
            d.close()
        self.cloud.close()


def domains_of(cfg: FleetConfig) -> list[Domain]:
    return resolve_sequence(cfg.stream)
