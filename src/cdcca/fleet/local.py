"""The embedded fleet: N device runtimes and one cloud runtime in one process, no network.

It runs the steps of :mod:`cdcca.runtime.protocol` — the same functions the Flower apps call — through the
same runtimes, moving the same packets, so what the demo measures is what a deployment would do.
"""

from __future__ import annotations

import time
from pathlib import Path

from cdcca.config import RunConfig
from cdcca.data.scenario import Slot, stream_spec
from cdcca.data.stream import Domain, resolve_sequence
from cdcca.fleet.traffic import SimulatedTraffic
from cdcca.model.placement import check_torch_device
from cdcca.runtime import protocol
from cdcca.runtime.cloud import CloudRuntime, RoundStudy
from cdcca.runtime.device import DeviceRuntime
from cdcca.trained_pair import run_answers, use


def schedule(cfg: RunConfig) -> list[Slot]:
    """The rounds of the run: its scenario over its domains."""
    return cfg.scenario.schedule(resolve_sequence(cfg.data.domains))


def domains_of(cfg: RunConfig) -> list[Domain]:
    """The distinct domains the run's schedule visits (gradual: each severity of its corruption)."""
    return cfg.scenario.domains(resolve_sequence(cfg.data.domains))


class LocalFleet:
    def __init__(self, cfg: RunConfig, out_dir: Path, devices: list[DeviceRuntime], cloud: CloudRuntime):
        self.cfg, self.out, self.devices, self.cloud = cfg, out_dir, devices, cloud
        self.history: list[dict] = []
        self.slots = schedule(cfg)
        self.links = {dev.device_id: protocol.DelayedLink(cfg.stream.update_delay) for dev in devices}
        self.traffic = {dev.device_id: SimulatedTraffic.of(dev) for dev in devices}   # what the devices are asked
        self.receive_s: list[float] = []           # per uplink: packet → acknowledgements (the cloud's inbox)
        self.trained: list[str] = []               # every sample id AKD trained on, in order
        self.acked: list[str] = []                 # every sample id the cloud acknowledged
        self.cloud_s: list[float] = []             # per round: the cloud's AKD → DWC seconds, all devices

    @classmethod
    def setup(cls, cfg: RunConfig, out_dir: Path) -> LocalFleet:
        out_dir = Path(out_dir)
        use(cfg.model.weights)                     # the pair every runtime of the fleet serves
        tiny, fleet = cfg.model.tiny, cfg.fleet
        cloud = CloudRuntime.open(out_dir / "cloud", tiny=tiny, akd=cfg.akd, dwc=cfg.dwc,
                                  candidates=run_answers(cfg.data.domains, tiny),
                                  torch_device=check_torch_device(cfg.torch_device))
        if fleet.group not in (None, "all"):
            raise ValueError(f"fleet.group must be 'all' (one fleet group) or unset (a student per device), got {fleet.group!r}")
        devices = []
        for i in range(fleet.devices):
            d = out_dir / "devices" / f"dev-{i}"
            stream = {**stream_spec(cfg.data.domains, cfg.scenario, cfg.seed, i, fleet.devices), "per_round": 8}
            if (d / "device.json").exists():
                devices.append(DeviceRuntime.open(d))
            else:
                devices.append(DeviceRuntime.create(d, f"dev-{i}", tiny=tiny, uts=cfg.uts, stream=stream))
            cloud.set_group(f"dev-{i}", fleet.group)
        return cls(cfg, out_dir, devices, cloud)

    def run_round(self, rnd: int, evaluate=None, study: RoundStudy | None = None, serve_only: bool = False) -> list[dict]:
        """One round of :mod:`cdcca.runtime.protocol` for the whole fleet: every device answers its requests,
        then every device's uplink, the cloud's step for all of them (uploads committed before any training,
        so a group learns from all its members), every device's apply (and resync if needed); then an
        optional evaluation. ``study``: a benchmark's inputs to the cloud's round; ``serve_only``: the
        devices answer and nothing moves (the never-updated reference)."""
        t0 = time.perf_counter()
        befores = {dev.device_id: dev.status() for dev in self.devices}
        cloud_s: dict[str, float] = {}
        early = self.cfg.fleet.early_round if not serve_only and self.cfg.uts.shift_z > 0 else 0   # reacting needs reports
        served = {dev.device_id: self._serve_reacting(dev, rnd, early, study, cloud_s) if early
                  else self.traffic[dev.device_id].serve(dev, rnd) for dev in self.devices}
        downs = {dev.device_id: protocol.DownlinkMessage(acked=[]) for dev in self.devices}
        if not serve_only:
            ups = {dev.device_id: protocol.device_uplink(dev, rnd, served=served[dev.device_id]) for dev in self.devices}
            late = any(link.in_transit for link in self.links.values())
            receive_s: dict[str, float] = {}
            trained: dict[str, list[str]] = {}
            downs = protocol.cloud_round(self.cloud, ups, timing=cloud_s, catch_up=not late, study=study,
                                         trained=trained, receive_timing=receive_s)
            self.receive_s += list(receive_s.values())
            self.trained += [sid for ids in trained.values() for sid in ids]
            self.acked += [sid for down in downs.values() for sid in down.acked]
        self.cloud_s.append(sum(cloud_s.values()))
        rows = []
        for dev in self.devices:
            before, link = befores[dev.device_id], self.links[dev.device_id]
            after = protocol.deliver(dev, self.cloud, rnd, downs[dev.device_id], link).status if not serve_only \
                else dev.status()
            if not link.in_transit and not serve_only:
                assert after["hash"] == self.cloud.mirror_hash(dev.device_id), "device and cloud mirror diverged"
            slot = self.slots[rnd % len(self.slots)]
            row = {"round": rnd, "device": dev.device_id, "domain": served[dev.device_id]["domain"],
                   "online_mc": served[dev.device_id]["online_mc"], "correct": served[dev.device_id]["correct"],
                   "visit": slot.visit, "step": slot.step,
                   "uploads": len(downs[dev.device_id].acked) + served[dev.device_id].get("early_uploads", 0),
                   "bytes_up": after["bytes_up"] - before["bytes_up"], "bytes_down": after["bytes_down"] - before["bytes_down"],
                   "version": after["version"], "cloud_s": round(cloud_s.get(dev.device_id, 0.0), 2),
                   "early_rounds": served[dev.device_id].get("early_rounds", 0)}
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

    def _serve_reacting(self, dev: DeviceRuntime, rnd: int, piece: int, study: RoundStudy | None,
                        cloud_s: dict[str, float]) -> dict:
        """Serve round ``rnd`` ``piece`` requests at a time; when the device reports a shift, an early round from
        its uploads so far (AKD → DWC → apply) before it serves the rest: the reacting policy, for one device."""
        tokens, questions, gold, ids, domain = self.traffic[dev.device_id].chunk(rnd)
        correct: list[bool] = []
        early = uploads = 0
        for s in range(0, len(ids), piece):
            answers, _ = dev.answer_and_queue(tokens[s:s + piece], questions[s:s + piece], ids[s:s + piece],
                                              per_request=True)
            correct += [a.mc == g for a, g in zip(answers, gold[s:s + piece])]
            if dev.shift_pending is not None and s + piece < len(ids) and dev.outbox.size():
                timing: dict[str, float] = {}
                up = protocol.device_uplink(dev, rnd, piece, newest=True)     # as the ServerApp's shift round
                downs = protocol.cloud_round(self.cloud, {dev.device_id: up}, timing=timing, study=study)
                protocol.deliver(dev, self.cloud, rnd, downs[dev.device_id], self.links[dev.device_id])
                cloud_s[dev.device_id] = cloud_s.get(dev.device_id, 0.0) + sum(timing.values())
                self.acked += downs[dev.device_id].acked
                uploads += len(downs[dev.device_id].acked)
                dev.outbox.clear_shift()       # answered (by the update it just applied, or by nothing to learn)
                early += 1
        return {"round": rnd, "domain": domain, "requests": len(ids), "correct": correct, "early_rounds": early,
                "early_uploads": uploads,
                "online_mc": sum(correct) / len(correct) if correct else float("nan"), "outbox": dev.outbox.size()}

    def close(self) -> None:
        for d in self.devices:
            d.close()
        self.cloud.close()

