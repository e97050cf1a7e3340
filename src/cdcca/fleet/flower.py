"""The cdcca protocol as Flower apps: the cloud is the ServerApp, each device a ClientApp (Message API).

One round, for every connected device — the steps of :mod:`cdcca.runtime.protocol`, as the embedded fleet
(``cdcca.fleet.local``) runs them, with Flower messages as the transport:

    ServerApp (cloud)                              ClientApp (device; one process per message)
    query.uplink {round}                  ──►      serve_round(round); collect_uplink()
                  ◄── {device-id, packet?} + status
    cloud.receive(packet) → acked ids
    cloud.run_round(device) → its update packet
    train.apply {acked, packets}          ──►      ack_uplink(acked); apply(packet) for each
                  ◄── status, or a "resync" record on StaleBaseError
    train.apply {packets: [resync]}       ──►      (only after a stale base) apply(cloud.resync(device))
    evaluate {round}                      ──►      status()
                  ◄── status
    device hash == cloud.mirror_hash(device)  → one JSON line per round in CLOUD_DIR/fleet-rounds.jsonl

The apps stay thin: ``cdcca.runtime.device`` and ``cdcca.runtime.cloud`` hold all the ML and never import flwr. This module
imports neither torch nor the runtimes at import time, because the SuperNode starts a fresh
``flwr-clientapp`` process for every message.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

if TYPE_CHECKING:     # the protocol imports torch; the apps import it only when a step runs
    from cdcca.runtime.protocol import DownlinkMessage, UplinkMessage

ROUND_LOG = "fleet-rounds.jsonl"      # per-round metrics, one JSON object a line, in the cloud state dir


@dataclass
class FleetRunConfig:
    """The run config of the app ([tool.flwr.app.config] in fleet/app/pyproject.toml, kebab-case keys there).

    Defaults apply where a key is missing (unit tests pass an empty run config)."""

    rounds: int = 1                 # rounds to run now; a run continues after the last round in the log
    cloud_dir: str = "cloud-state"  # cloud state dir on the SuperLink host (relative: to the ServerApp's cwd)
    devices_dir: str = "device-states"  # simulation only: state dirs of the simulated devices
    tiny: bool = False              # tiny random models (tests); a device reads it when it creates its state
    min_nodes: int = 1              # connected devices to wait for before the first round
    node_wait_s: float = 120.0      # ... for at most this long
    reply_timeout_s: float = 1800.0 # one step's replies; serve_round on the real model takes minutes
    poll_s: float = 0.2             # between pulls of replies (Grid.send_and_receive sleeps 3 s)
    max_samples: int = 256          # uplink samples per packet
    akd_prefix_epochs: int = 15     # prefix distillation epochs (AKDConfig.prefix_epochs)
    akd_epochs: int = 0             # label-phase epochs (AKDConfig.epochs; off by default)
    akd_batch_size: int = 16
    dwc_budget_kb: int = 256        # update packet budget, as in the embedded fleet (DWCConfig default)
    group: str = ""                 # non-empty: every device joins this fleet group (one shared student)
    stream: str = "default"         # a device's simulated stream when it creates its state: built-in names, domains, JSONL files
    scenario: str = "persistent"    # persistent | recurring | gradual | one-round (cdcca.data.scenario)
    rounds_per_domain: int = 0      # 0: the scenario's default
    round_size: int = 0             # requests per round per device; 0: the scenario's default
    visits: int = 2                 # recurring: how many times the domains come back

    def stream_spec(self, index: int, n_devices: int) -> dict:
        """A new device's request-stream settings (checked here: a bad scenario fails before any round)."""
        from cdcca.data.scenario import Scenario, stream_spec

        scenario = Scenario(self.scenario, self.rounds_per_domain or None, self.round_size or None, self.visits)
        return stream_spec(self.stream, scenario, index=index, n_devices=n_devices)

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> FleetRunConfig:
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                names = ", ".join(sorted(k.replace("_", "-") for k in known))
                raise ValueError(f"unknown run config key {key!r}; known: {names}")
            kind = type(known[name].default)
            if (kind is bool) != isinstance(value, bool):
                want = "true or false" if kind is bool else kind.__name__
                raise ValueError(f"run config {key}={value!r} must be {want}")
            values[name] = kind(value)
        return cls(**values)


# ---------------------------------------------------------------------------------------------------
# records: Flower's ConfigRecord takes str/int/float/bool/bytes (and lists of one of them)

def _record(d: dict[str, Any]) -> ConfigRecord:
    """The values of ``d`` a ConfigRecord can carry (numpy scalars cast to Python); the rest dropped."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if hasattr(v, "item") and not isinstance(v, (bytes, str)):
            v = v.item()
        if isinstance(v, (str, int, float, bool, bytes)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and v and len({type(x) for x in v}) == 1 \
                and isinstance(v[0], (str, int, float, bool, bytes)):
            out[k] = list(v)
    return ConfigRecord(out)


def _dict(record: ConfigRecord | None) -> dict[str, Any]:
    return {} if record is None else dict(record.items())


# ---------------------------------------------------------------------------------------------------
# ClientApp: unpack, call the device runtime, pack the reply

client_app = ClientApp()


def device_home(node_config: dict[str, Any], cfg: FleetRunConfig) -> tuple[Path, str, int, int]:
    """(state dir, device name, stream slice index, slices) of this node.

    A deployed SuperNode names them (``--node-config 'data-dir="..." device-name="dev-1"'``, optionally
    ``device-index`` and ``num-devices``); a simulated one has only ``partition-id`` and ``num-partitions``
    and keeps its state under the run config's ``devices-dir``."""
    if "data-dir" in node_config:
        name = str(node_config.get("device-name") or Path(str(node_config["data-dir"])).name)
        return (Path(str(node_config["data-dir"])).expanduser(), name, int(node_config.get("device-index", 0)),
                int(node_config.get("num-devices", 1)))
    if "partition-id" in node_config:
        i = int(node_config["partition-id"])
        return Path(cfg.devices_dir) / f"dev-{i + 1}", f"dev-{i + 1}", i, int(node_config.get("num-partitions", 1))
    raise ValueError("the SuperNode has no data-dir; start it with "
                     "--node-config 'data-dir=\"/path/to/device\" device-name=\"dev-1\"'")


def open_device(context: Context):
    """This node's device runtime, created on first use (version 0: the shipped device adapters)."""
    from cdcca.runtime.device import CONFIG, DeviceRuntime

    cfg = FleetRunConfig.from_flower(context.run_config)
    data_dir, name, index, n = device_home(context.node_config, cfg)
    if (data_dir / CONFIG).is_file():
        return DeviceRuntime.open(data_dir)
    return DeviceRuntime.create(data_dir, name, tiny=cfg.tiny, stream=cfg.stream_spec(index, n))


@client_app.query("uplink")
def uplink(msg: Message, context: Context) -> Message:
    from cdcca.runtime.protocol import device_uplink

    cfg = msg.content["config"]
    with closing(open_device(context)) as device:
        up = device_uplink(device, int(cfg["round"]), int(cfg["max-samples"]))
        record = {"device-id": up.device_id, **({"packet": up.packet} if up.packet is not None else {})}
        return Message(RecordDict({"uplink": ConfigRecord(record), "served": _record(up.served),
                                   "status": _record(up.status)}), reply_to=msg)


@client_app.train("apply")
def apply(msg: Message, context: Context) -> Message:
    from cdcca.runtime.protocol import DownlinkMessage, device_apply

    down = msg.content["downlink"]
    with closing(open_device(context)) as device:
        report = device_apply(device, DownlinkMessage(list(down.get("acked", [])), list(down.get("packets", []))))
        if report.resync_reason is not None:
            return Message(RecordDict({"resync": ConfigRecord({"reason": report.resync_reason}),
                                       "status": _record(report.status)}), reply_to=msg)
        return Message(RecordDict({"applied": ConfigRecord({"status": report.applied} if report.applied else {}),
                                   "status": _record(report.status)}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    with closing(open_device(context)) as device:
        return Message(RecordDict({"status": _record(device.status())}), reply_to=msg)


# ---------------------------------------------------------------------------------------------------
# ServerApp: the round, one helper per step

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FleetRunConfig.from_flower(context.run_config)
    rounds = RoundLog(Path(cfg.cloud_dir) / ROUND_LOG)
    with closing(open_cloud(cfg)) as cloud:
        wait_for_nodes(grid, cfg)
        first = rounds.next_round()
        for rnd in range(first, first + cfg.rounds):
            clock = Stopwatch()
            with clock("uplink"):
                uplinks = collect_uplinks(grid, rnd, cfg)                                 # query.uplink
            with clock("cloud"):
                join_group(cloud, uplinks, cfg.group)
                downlinks = cloud_rounds(cloud, uplinks)                                  # receive → AKD → DWC
            with clock("apply"):
                resynced = send_downlinks(grid, cloud, uplinks, downlinks, rnd, cfg)      # train.apply (+ resync)
            with clock("status"):
                statuses = collect_status(grid, rnd, cfg)                                 # evaluate
            row = check_mirrors(cloud, rnd, uplinks, downlinks, resynced, statuses)
            rounds.append({**row, "wall_s": clock.total(), "step_s": clock.laps})
            log(INFO, "round %s: %s/%s devices in sync with their cloud mirror (%.1f s)",
                rnd, row["in_sync"], len(row["devices"]), clock.total())


def open_cloud(cfg: FleetRunConfig):
    from cdcca.akd.distill import AKDConfig
    from cdcca.data.stream import stream_candidates
    from cdcca.downlink import DWCConfig
    from cdcca.runtime.cloud import CloudRuntime

    return CloudRuntime.open(cfg.cloud_dir, tiny=cfg.tiny, candidates=None if cfg.tiny else stream_candidates(cfg.stream),
                             akd=AKDConfig(prefix_epochs=cfg.akd_prefix_epochs, epochs=cfg.akd_epochs,
                                           batch_size=cfg.akd_batch_size),
                             dwc=DWCConfig(budget_bytes=cfg.dwc_budget_kb * 1024))


def wait_for_nodes(grid: Grid, cfg: FleetRunConfig) -> None:
    deadline = time.monotonic() + cfg.node_wait_s
    while (n := len(list(grid.get_node_ids()))) < cfg.min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} of {cfg.min_nodes} devices connected after {cfg.node_wait_s:.0f} s; "
                               f"are the SuperNodes running and registered?")
        time.sleep(cfg.poll_s)


def exchange(grid: Grid, messages: list[Message], cfg: FleetRunConfig) -> list[tuple[Message, Message | None]]:
    """Push ``messages`` and pull until each has a reply or the timeout passes (no reply: None).

    Replies are matched by ``reply_to_message_id``: errors made by the SuperLink itself (node gone)
    come from node 1, not from the node asked."""
    ids = list(grid.push_messages(messages)) if messages else []
    waiting = {mid for mid in ids if mid}
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + cfg.reply_timeout_s
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            replies[reply.metadata.reply_to_message_id] = reply
            waiting.discard(reply.metadata.reply_to_message_id)
        if waiting:
            time.sleep(cfg.poll_s)
    return [(msg, replies.get(mid) if mid else None) for msg, mid in zip(messages, ids)]


def usable(msg: Message, reply: Message | None, want: str) -> bool:
    """True when ``reply`` answered ``msg`` without error and carries record ``want``; logs why not."""
    node = msg.metadata.dst_node_id
    if reply is None:
        log(WARNING, "%s: no reply from node %s in time; it is left out of this step", msg.metadata.message_type, node)
    elif reply.has_error():
        log(WARNING, "%s: node %s replied with error %s: %s", msg.metadata.message_type, node,
            reply.error.code, reply.error.reason)
    elif want not in reply.content:
        log(WARNING, "%s: node %s replied without %r", msg.metadata.message_type, node, want)
    else:
        return True
    return False


def _to(node_id: int, kind: str, rnd: int, **records: ConfigRecord) -> Message:
    return Message(RecordDict(records), dst_node_id=node_id, message_type=kind, group_id=str(rnd))


def collect_uplinks(grid: Grid, rnd: int, cfg: FleetRunConfig) -> dict[int, UplinkMessage]:
    """query.uplink to every connected node: each device serves its round and uploads its uncertain samples."""
    from cdcca.runtime.protocol import UplinkMessage

    names = {n.node_id: n.name for n in grid.get_nodes()}
    ask = ConfigRecord({"round": rnd, "max-samples": cfg.max_samples})
    uplinks = {}
    for msg, reply in exchange(grid, [_to(nid, "query.uplink", rnd, config=ask) for nid in names], cfg):
        if not usable(msg, reply, "uplink"):
            continue
        nid, up = msg.metadata.dst_node_id, _dict(reply.content["uplink"])
        device_id = str(up.get("device-id", ""))
        if not claims_own_name(nid, names[nid], device_id, up.get("packet")):
            continue
        uplinks[nid] = UplinkMessage(device_id, up.get("packet"), _dict(reply.content.get("served")),
                                     _dict(reply.content.get("status")))
    return uplinks


def claims_own_name(node_id: int, registered: str, device_id: str, packet: bytes | None) -> bool:
    """A node speaks only for the device it was registered as, and its packet for that device too."""
    from cdcca import wire

    try:
        named = packet and wire.describe(packet)["meta"].get("device_id")
    except wire.PacketError as exc:
        log(WARNING, "node %s sent a malformed uplink packet; ignored: %s", node_id, exc)
        return False
    if not device_id or (registered and device_id != registered) or (packet and named != device_id):
        log(WARNING, "node %s (registered as %r) reports device %r with a packet for %r; ignored",
            node_id, registered, device_id, named)
        return False
    return True


def join_group(cloud, uplinks: dict[int, UplinkMessage], group: str) -> None:
    """Put every device that took part in this round in the run's fleet group (when one is set)."""
    for up in uplinks.values():
        if group and cloud.group_of(up.device_id) != group:
            cloud.set_group(up.device_id, group)


def cloud_rounds(cloud, uplinks: dict[int, UplinkMessage]) -> dict[int, DownlinkMessage]:
    """The cloud's step of the round for every device (all uploads committed first, so a fleet group's
    student sees all its members); a device whose packet is rejected is left out."""
    from cdcca.runtime.protocol import cloud_round

    def rejected(_nid: int, up: UplinkMessage, exc: Exception) -> None:
        log(WARNING, "%s: uplink rejected, nothing acknowledged: %s", up.device_id, exc)

    return cloud_round(cloud, uplinks, on_reject=rejected)


def send_downlinks(grid: Grid, cloud, uplinks: dict[int, UplinkMessage], downlinks: dict[int, DownlinkMessage],
                   rnd: int, cfg: FleetRunConfig) -> set[int]:
    """train.apply to each device alone; a device on a stale base gets a dense resync. Returns resynced nodes."""
    msgs = [_to(nid, "train.apply", rnd, downlink=ConfigRecord({"acked": d.acked, "packets": d.packets}))
            for nid, d in downlinks.items() if d.acked or d.packets]
    stale = []
    for msg, reply in exchange(grid, msgs, cfg):
        if usable(msg, reply, "status") and "resync" in reply.content:
            stale.append(msg.metadata.dst_node_id)
            log(INFO, "%s needs a full resync: %s", uplinks[stale[-1]].device_id, reply.content["resync"]["reason"])
    from cdcca.runtime.protocol import cloud_resync

    resync = [_to(nid, "train.apply", rnd, downlink=ConfigRecord(
        {"acked": [], "packets": cloud_resync(cloud, uplinks[nid].device_id).packets})) for nid in stale]
    for msg, reply in exchange(grid, resync, cfg):
        usable(msg, reply, "status")
    return set(stale)


def collect_status(grid: Grid, rnd: int, cfg: FleetRunConfig) -> dict[int, dict[str, Any]]:
    """evaluate on every connected node: each device reports version, hash, outbox and byte counters."""
    msgs = [_to(nid, "evaluate", rnd, config=ConfigRecord({"round": rnd})) for nid in grid.get_node_ids()]
    return {msg.metadata.dst_node_id: _dict(reply.content["status"])
            for msg, reply in exchange(grid, msgs, cfg) if usable(msg, reply, "status")}


def check_mirrors(cloud, rnd: int, uplinks: dict[int, UplinkMessage], downlinks: dict[int, DownlinkMessage],
                  resynced: set[int], statuses: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One round's record: per device what moved and whether it now equals its cloud mirror."""
    devices = {}
    for nid, st in statuses.items():
        device_id = str(st.get("device_id", ""))
        up, down = uplinks.get(nid), downlinks.get(nid)
        in_sync = bool(device_id) and st.get("hash") == cloud.mirror_hash(device_id)
        if not in_sync:
            log(WARNING, "round %s: %s (node %s) differs from its cloud mirror", rnd, device_id, nid)
        devices[device_id] = {
            "node_id": nid, "version": st.get("version"), "hash": st.get("hash"), "in_sync": in_sync,
            "uploaded": len(down.acked) if down else 0,
            "update_bytes": sum(map(len, down.packets)) if down else 0,
            "caught_up": bool(down and down.caught_up), "resynced": nid in resynced,
            "outbox": st.get("outbox"), "bytes_up": st.get("bytes_up"), "bytes_down": st.get("bytes_down"),
            **({f"served_{k}": v for k, v in up.served.items() if k != "round"} if up else {}),
        }
    return {"round": rnd, "time": time.time(), "in_sync": sum(d["in_sync"] for d in devices.values()),
            "devices": devices}


class Stopwatch:
    """Seconds per named step of a round: ``with clock("uplink"): ...``."""

    def __init__(self):
        self.start = time.perf_counter()
        self.laps: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.laps[name] = round(time.perf_counter() - t0, 2)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


class RoundLog:
    """Per-round records as JSON lines; a new run continues after the last round written."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def rows(self) -> Iterable[dict[str, Any]]:
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)

    def next_round(self) -> int:
        return max((r["round"] + 1 for r in self.rows()), default=0)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_finite(row), allow_nan=False, default=str) + "\n")


def _finite(x: Any) -> Any:
    """NaN and infinities become null, so every line is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
