"""The embedded fleet: N device runtimes and one cloud runtime in one process, no network.

It runs the steps of :mod:`cdcca.runtime.protocol` — the same functions the Flower apps call — through the
same runtimes, moving the same packets, so what the demo measures is what a deployment would do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cdcca.akd.distill import AKDConfig
from cdcca.data.scenario import STREAM_BUDGET, Scenario, Slot, stream_spec
from cdcca.data.stream import Domain, resolve_sequence
from cdcca.downlink import DWCConfig
from cdcca.presets import apply_config, load_preset
from cdcca.runtime import protocol
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime
from cdcca.uplink import UTSConfig


@dataclass
class FleetConfig:
    devices: int = field(default=1, metadata={"help": "devices in the fleet, each with its own slice of every round"})
    stream: str = field(default="default", metadata={"help": "the shift stream: built-in names, NAME:SEVERITY, .jsonl files"})
    scenario: str = field(default="persistent", metadata={"help": "how long each domain lasts: persistent | recurring | gradual | one-round"})
    rounds_per_domain: int | None = field(default=None, metadata={"help": "None: the scenario's default (persistent: 4)"})
    round_size: int | None = field(default=None, metadata={"help": "requests per round per device; None: the scenario's default (persistent: 80)"})
    visits: int = field(default=2, metadata={"help": "recurring: how many times the domains come back"})
    update_delay: int = field(default=0, metadata={"help": "rounds an update spends in transit (0: live from the next round)"})
    heldout_n: int = field(default=200, metadata={"help": "held-out questions per domain for the final accuracy"})
    curve_n: int | None = field(default=None, metadata={"help": "... for the curves of the rounds before the last (None: heldout_n)"})
    # per device and round, like the round size: each device uploads the same share of its own requests
    uts: UTSConfig = field(default_factory=lambda: UTSConfig(selection="budget", budget=STREAM_BUDGET), metadata={"help": "each device's UTS: which requests and tokens it uploads per round"})
    akd: AKDConfig = field(default_factory=AKDConfig, metadata={"help": "the cloud's distillation into each device's adapters"})
    dwc: DWCConfig = field(default_factory=DWCConfig, metadata={"help": "the compressed downlink of each update"})
    tiny: bool = field(default=False, metadata={"help": "tiny random models and random tokens: transport checks only"})
    seed: int = field(default=0, metadata={"help": "which requests the stream draws, and training randomness"})
    group: str | None = field(default=None, metadata={"help": "'all': every device in one fleet group sharing one student"})
    torch_device: str = field(default="cpu", metadata={"help": "torch device of the cloud's teacher and student (cpu, cuda, cuda:N); devices stay on the CPU"})

    def __post_init__(self):
        if not isinstance(self.update_delay, int) or self.update_delay < 0:
            raise ValueError(f"update delay must be a whole number of rounds ≥ 0; got {self.update_delay!r}")
        self.scenario_spec()                      # a bad scenario fails here, before any model loads

    def scenario_spec(self) -> Scenario:
        return Scenario(self.scenario, self.rounds_per_domain, self.round_size, self.visits)

    def schedule(self) -> list[Slot]:
        return self.scenario_spec().schedule(resolve_sequence(self.stream))

    @property
    def rounds(self) -> int:
        return len(self.schedule())


def preset_config(name: str) -> FleetConfig:
    """The embedded fleet's settings of a named preset: ``configs/NAME.toml`` (what ``cdcca demo --preset NAME`` runs)."""
    return apply_config(FleetConfig(), load_preset(name))


class LocalFleet:
    def __init__(self, cfg: FleetConfig, out_dir: Path, devices: list[DeviceRuntime], cloud: CloudRuntime):
        self.cfg, self.out, self.devices, self.cloud = cfg, out_dir, devices, cloud
        self.history: list[dict] = []
        self.slots = cfg.schedule()
        self.links = {dev.device_id: protocol.DelayedLink(cfg.update_delay) for dev in devices}

    @classmethod
    def setup(cls, cfg: FleetConfig, out_dir: Path) -> LocalFleet:
        out_dir = Path(out_dir)
        from cdcca.data.stream import stream_candidates
        from cdcca.model.placement import check_torch_device

        cloud = CloudRuntime.open(out_dir / "cloud", tiny=cfg.tiny, akd=cfg.akd, dwc=cfg.dwc,
                                  candidates=None if cfg.tiny else stream_candidates(cfg.stream),
                                  torch_device=check_torch_device(cfg.torch_device))
        if cfg.group not in (None, "all"):
            raise ValueError(f"group must be 'all' (one fleet group) or unset (a student per device), got {cfg.group!r}")
        devices = []
        for i in range(cfg.devices):
            d = out_dir / "devices" / f"dev-{i}"
            stream = {**stream_spec(cfg.stream, cfg.scenario_spec(), cfg.seed, i, cfg.devices), "per_round": 8}
            if (d / "device.json").exists():
                devices.append(DeviceRuntime.open(d))
            else:
                devices.append(DeviceRuntime.create(d, f"dev-{i}", tiny=cfg.tiny, uts=cfg.uts, stream=stream))
            cloud.set_group(f"dev-{i}", cfg.group)
        return cls(cfg, out_dir, devices, cloud)

    def run_round(self, rnd: int, evaluate=None) -> list[dict]:
        """One round of :mod:`cdcca.runtime.protocol` for the whole fleet: every device's uplink, the cloud's
        step for all of them (uploads committed before any training, so a group learns from all its
        members), every device's apply (and resync if needed); then an optional evaluation."""
        t0 = time.perf_counter()
        befores = {dev.device_id: dev.status() for dev in self.devices}
        served = {dev.device_id: dev.serve_round(rnd) for dev in self.devices}   # the simulated traffic
        ups = {dev.device_id: protocol.device_uplink(dev, rnd, served=served[dev.device_id]) for dev in self.devices}
        cloud_s: dict[str, float] = {}
        late = any(link.in_transit for link in self.links.values())
        downs = protocol.cloud_round(self.cloud, ups, timing=cloud_s, catch_up=not late)
        rows = []
        for dev in self.devices:
            up, before, link = ups[dev.device_id], befores[dev.device_id], self.links[dev.device_id]
            after = protocol.deliver(dev, self.cloud, rnd, downs[dev.device_id], link).status
            if not link.in_transit:
                assert after["hash"] == self.cloud.mirror_hash(dev.device_id), "device and cloud mirror diverged"
            slot = self.slots[rnd % len(self.slots)]
            row = {"round": rnd, "device": dev.device_id, "domain": up.served["domain"], "online_mc": up.served["online_mc"],
                   "visit": slot.visit, "step": slot.step,
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
    """The distinct domains the run's schedule visits (gradual: each severity of its corruption)."""
    return cfg.scenario_spec().domains(resolve_sequence(cfg.stream))
