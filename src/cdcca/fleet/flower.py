"""The cdcca protocol as Flower apps — the devices' side and the run config; the cloud's is :mod:`cdcca.fleet.server`.

The cloud is the ServerApp, each device a ClientApp (Message API). A round, for every connected device,
runs the steps of :mod:`cdcca.runtime.protocol` with Flower messages as the transport:

    ServerApp (cloud)                              ClientApp (device; one process per message)
    query.status                          ──►      the outbox's queue, read without torch (round trigger)
                  ◄── {queued}
    query.uplink {round}                  ──►      [traffic="stream": serve_round(round)]; collect_uplink()
                  ◄── {device-id, packet?} + status
    cloud.receive(packet) → acked ids; cloud.run_round(device) → its update packet
    train.apply {acked, packets}          ──►      ack_uplink(acked); apply(packet) for each
                  ◄── status, or a "resync" record on StaleBaseError
    train.apply {packets: [resync]}       ──►      (only after a stale base) apply(cloud.resync(device))
    evaluate {round}                      ──►      status()

A deployed device is served by its own API process (``cdcca device api`` on the same state dir): the
API answers and fills the outbox, the ClientApp only packs the outbox and applies updates into the
adapter store, which the API follows between two batches. Only a simulated device (a simulation's
node, or ``traffic="stream"``) replays a request stream.

The apps stay thin: ``cdcca.runtime.device`` and ``cdcca.runtime.cloud`` hold all the ML and never import
flwr. This module imports neither torch nor the runtimes at import time, because the SuperNode starts a
fresh ``flwr-clientapp`` process for every message.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

ROUND_LOG = "fleet-rounds.jsonl"      # per-round metrics, one JSON object a line, in the cloud state dir
STOP_FILE = "stop"                    # in the cloud state dir: the ServerApp ends after its current round
TRAFFIC = ("api", "stream")


@dataclass
class FleetRunConfig:
    """The run config of the app ([tool.flwr.app.config] in fleet/app/pyproject.toml, kebab-case keys there).

    Defaults apply where a key is missing (unit tests pass an empty run config)."""

    rounds: int = field(default=1, metadata={"help": "rounds to run now (0: until stopped); a run continues after the last round logged"})
    traffic: str = field(default="api", metadata={"help": "api: the device's API fills its outbox; stream: replay the simulated stream"})
    round_every_s: float = field(default=0.0, metadata={"help": "> 0: a round at most this long after the last one began (if anything is queued)"})
    min_uploads: int = field(default=0, metadata={"help": "> 0: a round as soon as the devices' outboxes hold this many samples"})
    status_every_s: float = field(default=5.0, metadata={"help": "how often the outboxes are asked while waiting for a trigger"})
    preset: str = field(default="", metadata={"help": "a named preset (cdcca demo --preset) for the AKD, DWC and new devices' UTS"})
    cloud_dir: str = field(default="cloud-state", metadata={"help": "cloud state dir on the SuperLink host (relative: to the ServerApp's cwd)"})
    devices_dir: str = field(default="device-states", metadata={"help": "simulation only: state dirs of the simulated devices"})
    tiny: bool = field(default=False, metadata={"help": "tiny random models (tests); a device reads it when it creates its state"})
    min_nodes: int = field(default=1, metadata={"help": "connected devices to wait for before the first round"})
    node_wait_s: float = field(default=120.0, metadata={"help": "... for at most this long"})
    reply_timeout_s: float = field(default=1800.0, metadata={"help": "one step's replies; replaying a stream round on the real model takes minutes"})
    poll_s: float = field(default=0.2, metadata={"help": "between pulls of replies (Grid.send_and_receive sleeps 3 s)"})
    max_samples: int = field(default=256, metadata={"help": "uplink samples per packet"})
    akd_prefix_epochs: int = field(default=15, metadata={"help": "prefix distillation epochs (AKDConfig.prefix_epochs)"})
    akd_epochs: int = field(default=0, metadata={"help": "label-phase epochs (AKDConfig.epochs; off by default)"})
    akd_batch_size: int = field(default=16, metadata={"help": "uploads per AKD step"})
    dwc_budget_kb: int = field(default=256, metadata={"help": "update packet budget, as in the embedded fleet (DWCConfig default)"})
    group: str = field(default="", metadata={"help": "non-empty: every device joins this fleet group (one shared student)"})
    stream: str = field(default="default", metadata={"help": "a device's simulated stream when it creates its state: built-in names, domains, JSONL files"})
    scenario: str = field(default="persistent", metadata={"help": "persistent | recurring | gradual | one-round (cdcca.data.scenario)"})
    rounds_per_domain: int = field(default=0, metadata={"help": "0: the scenario's default"})
    round_size: int = field(default=0, metadata={"help": "requests per round per device; 0: the scenario's default"})
    visits: int = field(default=2, metadata={"help": "recurring: how many times the domains come back"})
    torch_device: str = field(default="cpu", metadata={"help": "torch device of the ServerApp's teacher and student (cpu, cuda, cuda:N); checked when the cloud opens"})

    def __post_init__(self):
        if self.traffic not in TRAFFIC:
            raise ValueError(f"run config traffic={self.traffic!r} must be one of {', '.join(TRAFFIC)}")
        if min(self.rounds, self.min_uploads) < 0 or min(self.round_every_s, self.status_every_s) < 0:
            raise ValueError("run config rounds, min-uploads, round-every-s and status-every-s must be ≥ 0")
        self.stream_spec(0, 1)
        if self.preset:                          # a preset that does not exist fails before any round
            from cdcca.presets import load_preset

            load_preset(self.preset)

    @property
    def triggered(self) -> bool:
        """Rounds wait for a trigger (time or queued uploads) instead of following each other."""
        return self.round_every_s > 0 or self.min_uploads > 0

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
        cfg = cls(**values)
        cfg.given = frozenset(values)           # what the run named, over the preset's settings
        return cfg

    def fleet_config(self):
        """The preset's embedded-fleet settings (AKD, DWC, UTS), or the defaults without a preset."""
        from cdcca.fleet.local import FleetConfig, preset_config

        return preset_config(self.preset) if self.preset else FleetConfig()

    def akd_config(self):
        from dataclasses import replace

        named = {"akd_prefix_epochs": "prefix_epochs", "akd_epochs": "epochs", "akd_batch_size": "batch_size"}
        given = getattr(self, "given", frozenset()) if self.preset else frozenset(named)   # a preset: only named keys
        return replace(self.fleet_config().akd, **{v: getattr(self, k) for k, v in named.items() if k in given})

    def dwc_config(self):
        from dataclasses import replace

        given = getattr(self, "given", frozenset()) if self.preset else {"dwc_budget_kb"}
        dwc = self.fleet_config().dwc
        return replace(dwc, budget_bytes=self.dwc_budget_kb * 1024) if "dwc_budget_kb" in given else dwc


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


def open_device(context: Context, cfg: FleetRunConfig | None = None):
    """This node's device runtime, created on first use (version 0: the shipped device adapters)."""
    from cdcca.runtime.device import CONFIG, DeviceRuntime

    cfg = cfg or FleetRunConfig.from_flower(context.run_config)
    data_dir, name, index, n = device_home(context.node_config, cfg)
    if (data_dir / CONFIG).is_file():
        return DeviceRuntime.open(data_dir)
    uts = cfg.fleet_config().uts if cfg.preset else None
    return DeviceRuntime.create(data_dir, name, tiny=cfg.tiny, uts=uts, stream=cfg.stream_spec(index, n))


def replays_stream(context: Context, cfg: FleetRunConfig) -> bool:
    """Whether this node answers a simulated stream before its uplink: a simulation's node always, a
    deployed one only when the run asks for ``traffic="stream"`` (its API fills the outbox otherwise)."""
    return "partition-id" in context.node_config or cfg.traffic == "stream"


@client_app.query("status")
def queue_status(msg: Message, context: Context) -> Message:
    """The outbox's queue for the round trigger: SQLite only, no torch, so polling it stays cheap."""
    from cdcca.runtime.queue_status import outbox_queue

    data_dir, name, _, _ = device_home(context.node_config, FleetRunConfig.from_flower(context.run_config))
    return Message(RecordDict({"queue": ConfigRecord({"device-id": name, **outbox_queue(data_dir)})}), reply_to=msg)


@client_app.query("uplink")
def uplink(msg: Message, context: Context) -> Message:
    from cdcca.runtime.protocol import device_uplink

    ask, run = msg.content["config"], FleetRunConfig.from_flower(context.run_config)
    rnd = int(ask["round"])
    with closing(open_device(context, run)) as device:
        served = device.serve_round(rnd) if replays_stream(context, run) else None
        up = device_uplink(device, rnd, int(ask["max-samples"]), served)
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
