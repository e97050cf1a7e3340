"""One round of the cdcca protocol, step by step: the only place a step of a round is written down.

A round moves what the device's outbox holds; it never answers requests. Whatever serves the device
fills the outbox between rounds: its API (``cdcca device api``), ``cdcca device serve``, or a simulated
driver replaying a stream (:mod:`cdcca.bench.loop`, :mod:`cdcca.fleet.local`, the Flower simulation)
before it calls :func:`device_uplink`. The drivers differ only in the transport between these steps
(a function call in :mod:`cdcca.fleet.local`, Flower messages in :mod:`cdcca.fleet.flower`):

    device_uplink(device, round)   device   requeue samples whose acknowledgement never came, pack the
                                            outbox → :class:`UplinkMessage`
    cloud_downlink(cloud, up)      cloud    commit the uploads (their ids are the acknowledgements),
                                            replay the update a device missed (catch-up: its hash is
                                            not the mirror's), then AKD → DWC → :class:`DownlinkMessage`
    device_apply(device, down)     device   drop acknowledged samples, apply the packets in order →
                                            :class:`ApplyReport` (a stale base asks for a resync)
    cloud_resync(cloud, device)    cloud    a dense resync packet for a device that fell out of sync

A fleet runs the cloud's step as :func:`cloud_round`: the same step for every device, but all uplinks
are committed before any training, so a fleet group's shared student learns from all its members.

The messages hold bytes, strings and numbers only, so any transport can carry them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cdcca.akd.interrupt import RoundInterrupted, StopCheck
from cdcca.runtime.adapter_store import StaleBaseError
from cdcca.wire import PacketError


@dataclass
class UplinkMessage:
    """What one device sends at the start of a round."""

    device_id: str
    packet: bytes | None            # None: nothing uncertain to upload this round
    status: dict[str, Any]          # version, hash, outbox, byte counters before the cloud step
    served: dict[str, Any] = field(default_factory=dict)  # a simulated driver's online metrics of the round


@dataclass
class DownlinkMessage:
    """What the cloud sends one device back: acknowledgements and packets, applied in order."""

    acked: list[str]
    packets: list[bytes] = field(default_factory=list)
    caught_up: bool = False         # the first packet replays an update whose delivery was lost


@dataclass
class ApplyReport:
    applied: list[str]              # the store's status per packet ("applied", "already_applied")
    resync_reason: str | None       # set when a packet's base was not the device's version
    status: dict[str, Any]


def device_uplink(device, rnd: int, max_samples: int = 256, served: dict[str, Any] | None = None,
                  newest: bool = False) -> UplinkMessage:
    """Pack what the outbox holds (``rnd`` only names the round; nothing is served here). ``served``: the
    online metrics of a driver that answered this round's requests itself, carried along for its log;
    ``newest``: the ``max_samples`` most recent samples (a round that reacts to a shift), the rest wait."""
    device.outbox.requeue()          # still in flight = their ack was lost; the cloud dedups sample ids
    packet = device.collect_uplink(max_samples, newest=newest)
    return UplinkMessage(device.device_id, packet, device.status(), dict(served or {}))


def cloud_receive(cloud, up: UplinkMessage, catch_up: bool = True) -> DownlinkMessage:
    """Commit the uploads and replay an update the device missed (its acknowledgements and catch-up).
    ``catch_up=False`` when the driver knows an update is still in transit (a :class:`DelayedLink`), so a
    device behind the mirror is late, not lost. A malformed packet raises :class:`cdcca.wire.PacketError`
    before anything is stored or acknowledged."""
    down = DownlinkMessage(acked=cloud.receive(up.packet) if up.packet is not None else [])
    if catch_up and up.status.get("hash") != cloud.mirror_hash(up.device_id):     # an earlier delivery got lost
        missed = cloud.update_for(up.device_id, int(up.status.get("version", -1)))
        down.packets.append(missed if missed is not None else cloud.resync(up.device_id))
        down.caught_up = True
    return down


def cloud_update(cloud, up: UplinkMessage, down: DownlinkMessage, study=None, only=None,
                 should_stop: StopCheck | None = None) -> DownlinkMessage:
    """AKD → DWC for this device (or its group's shared student), appended to ``down``; ``study``: a
    benchmark's :class:`~cdcca.runtime.cloud.RoundStudy` (true labels, teacher answers), never a deployment's;
    ``only`` and ``should_stop`` as for :meth:`~cdcca.runtime.cloud.CloudRuntime.run_round`."""
    update = cloud.run_round(up.device_id, study, only=only, should_stop=should_stop)
    if update is not None:
        down.packets.append(update)
    return down


def cloud_downlink(cloud, up: UplinkMessage, catch_up: bool = True, study=None) -> DownlinkMessage:
    """The cloud's whole step for one device: :func:`cloud_receive`, then :func:`cloud_update`."""
    return cloud_update(cloud, up, cloud_receive(cloud, up, catch_up), study)


def cloud_round(cloud, uplinks: dict[Any, UplinkMessage], on_reject=None, timing: dict[Any, float] | None = None,
                catch_up: bool = True, trained: dict[Any, list[str]] | None = None, study=None,
                receive_timing: dict[Any, float] | None = None, fresh_only: bool = False,
                should_stop: StopCheck | None = None) -> dict[Any, DownlinkMessage]:
    """The cloud's step for a whole fleet: every uplink is committed before any training, so a group's
    shared student learns from all its members' uploads of the round. A device whose packet is
    malformed is left out (``on_reject(key, up, error)``), the others go on. ``timing`` receives each
    device's cloud seconds (AKD → DWC), ``receive_timing`` the seconds from its packet to its
    acknowledgements, and ``trained`` the sample ids AKD trained on (a group's training is counted on the
    member that ran it).

    ``fresh_only`` (a round that reacts to a shift): AKD trains on this round's uploads only; uploads an
    interrupted round left untrained wait for the next regular round. ``should_stop``: asked before every
    training step; once it says so, the devices not trained yet get their acknowledgements (and catch-up)
    only, and their uploads stay pending in the cloud."""

    received = {}
    for key, up in uplinks.items():
        try:
            t0 = time.perf_counter()
            received[key] = cloud_receive(cloud, up, catch_up)
            if receive_timing is not None and up.packet is not None:
                receive_timing[key] = time.perf_counter() - t0
        except PacketError as exc:
            if on_reject is None:
                raise
            on_reject(key, up, exc)
    fresh = {sid for down in received.values() for sid in down.acked} if fresh_only else None
    downlinks = {}
    for key, down in received.items():
        try:
            downlinks[key] = cloud_update(cloud, uplinks[key], down, study, fresh, should_stop)
        except RoundInterrupted:
            return {**downlinks, **{k: d for k, d in received.items() if k not in downlinks}}
        if timing is not None:
            timing[key] = cloud.last_round_s
        if trained is not None:
            trained[key] = list(cloud.last_round.sample_ids) if cloud.last_round is not None else []
    return downlinks


def device_apply(device, down: DownlinkMessage) -> ApplyReport:
    device.ack_uplink(list(down.acked))
    applied = []
    for packet in down.packets:
        try:
            applied.append(device.apply(packet)["status"])
        except StaleBaseError as exc:
            return ApplyReport(applied, str(exc), device.status())
    return ApplyReport(applied, None, device.status())


def cloud_resync(cloud, device_id: str) -> DownlinkMessage:
    return DownlinkMessage(acked=[], packets=[cloud.resync(device_id)])


class DelayedLink:
    """The downlink of one device as a pipe ``delay`` rounds long, as a slow link or a busy cloud makes
    it: the packets sent in round k are applied after round k + delay (0: before the next round).
    Acknowledgements are not delayed — the cloud holds the uploads; only its update is late."""

    def __init__(self, delay: int = 0):
        if delay < 0:
            raise ValueError(f"update delay must be ≥ 0 rounds, got {delay}")
        self.delay = delay
        self.queue: list[tuple[int, list[bytes]]] = []

    def send(self, rnd: int, packets: list[bytes]) -> None:
        if packets:
            self.queue.append((rnd + self.delay, list(packets)))

    def arrived(self, rnd: int) -> list[bytes]:
        """The packets due by the end of round ``rnd``, in the order they were sent."""
        due = [p for at, packets in self.queue if at <= rnd for p in packets]
        self.queue = [(at, packets) for at, packets in self.queue if at > rnd]
        return due

    @property
    def in_transit(self) -> bool:
        return bool(self.queue)


def deliver(device, cloud, rnd: int, down: DownlinkMessage, link: DelayedLink) -> ApplyReport:
    """Acknowledge now, apply what ``link`` delivers by the end of round ``rnd``; resync a device whose base
    no longer matches (the resync replaces whatever is still in transit)."""
    device.ack_uplink(list(down.acked))
    link.send(rnd, down.packets)
    report = device_apply(device, DownlinkMessage(acked=[], packets=link.arrived(rnd)))
    if report.resync_reason is not None:
        link.queue.clear()
        report = device_apply(device, cloud_resync(cloud, device.device_id))
    return report


def run_round(device, cloud, rnd: int, max_samples: int = 256, link: DelayedLink | None = None,
              served: dict[str, Any] | None = None, study=None) -> tuple[UplinkMessage, DownlinkMessage, ApplyReport]:
    """All four steps for one device in one process; ``link`` delays the update, ``served`` as for
    :func:`device_uplink` (the caller has already answered the round's requests), ``study`` as for
    :func:`cloud_update`."""
    link = link or DelayedLink(0)
    up = device_uplink(device, rnd, max_samples, served)
    down = cloud_downlink(cloud, up, catch_up=not link.in_transit, study=study)
    return up, down, deliver(device, cloud, rnd, down, link)
