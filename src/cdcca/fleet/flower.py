"""The cdcca protocol as Flower apps — the devices' side and the run config; the cloud's is :mod:`cdcca.fleet.server`.

The cloud is the ServerApp, each device a ClientApp (Message API). A round, for every connected device,
runs the steps of :mod:`cdcca.runtime.protocol` with Flower messages as the transport:

    ServerApp (cloud)                              ClientApp (device; one process per message)
    query.status                          ──►      the outbox's queue, read without torch (round trigger)
                  ◄── {queued}
    query.uplink {round}                  ──►      [fleet.traffic="stream": serve_round(round)]; collect_uplink()
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
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from cdcca.config import RunConfig, from_flat
from cdcca.data.scenario import stream_spec
from cdcca.runtime.queue_status import outbox_queue

ROUND_LOG = "fleet-rounds.jsonl"      # per-round metrics, one JSON object a line, in the cloud state dir
STOP_FILE = "stop"                    # in the cloud state dir: the ServerApp ends after its current round
READY_FILE = "ready"                  # in the cloud state dir: the ServerApp has loaded its models and seen its devices


def run_config(context: Context) -> RunConfig:
    """The run's config: the Flower run config is the flat form of :class:`~cdcca.config.RunConfig`
    (``fleet.min_uploads``, ``akd.prefix.epochs``, …; keys it lacks keep their defaults)."""
    return from_flat(context.run_config)


def new_device_stream(cfg: RunConfig, index: int, n_devices: int) -> dict:
    """A new device's request-stream settings: its slice of the run's scenario."""
    return stream_spec(cfg.data.domains, cfg.scenario, index=index, n_devices=n_devices)


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


def device_home(node_config: dict[str, Any], cfg: RunConfig) -> tuple[Path, str, int, int]:
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
        return Path(cfg.fleet.devices_dir) / f"dev-{i + 1}", f"dev-{i + 1}", i, int(node_config.get("num-partitions", 1))
    raise ValueError("the SuperNode has no data-dir; start it with "
                     "--node-config 'data-dir=\"/path/to/device\" device-name=\"dev-1\"'")


def open_device(context: Context, cfg: RunConfig | None = None):
    """This node's device runtime, created on first use (version 0: the shipped device adapters)."""
    from cdcca.runtime.device import CONFIG, DeviceRuntime  # torch: imported only when a step runs

    cfg = cfg or run_config(context)
    data_dir, name, index, n = device_home(context.node_config, cfg)
    if (data_dir / CONFIG).is_file():
        return DeviceRuntime.open(data_dir)
    return DeviceRuntime.create(data_dir, name, tiny=cfg.model.tiny, uts=cfg.uts, stream=new_device_stream(cfg, index, n))


def replays_stream(context: Context, cfg: RunConfig) -> bool:
    """Whether this node answers a simulated stream before its uplink: a simulation's node always, a
    deployed one only when the run asks for ``traffic="stream"`` (its API fills the outbox otherwise)."""
    return "partition-id" in context.node_config or cfg.fleet.traffic == "stream"


@client_app.query("status")
def queue_status(msg: Message, context: Context) -> Message:
    """The outbox's queue for the round trigger: SQLite only, no torch, so polling it stays cheap."""
    data_dir, name, _, _ = device_home(context.node_config, run_config(context))
    return Message(RecordDict({"queue": ConfigRecord({"device-id": name, **outbox_queue(data_dir)})}), reply_to=msg)


@client_app.query("uplink")
def uplink(msg: Message, context: Context) -> Message:
    from cdcca.fleet.traffic import serve_round  # torch: only when a step runs, not for every message
    from cdcca.runtime.protocol import device_uplink  # (the same)

    ask, run = msg.content["config"], run_config(context)
    rnd = int(ask["round"])
    with closing(open_device(context, run)) as device:
        served = serve_round(device, rnd) if replays_stream(context, run) else None
        up = device_uplink(device, rnd, int(ask["max-samples"]), served, newest=bool(ask.get("newest", False)))
        record = {"device-id": up.device_id, **({"packet": up.packet} if up.packet is not None else {})}
        return Message(RecordDict({"uplink": ConfigRecord(record), "served": _record(up.served),
                                   "status": _record(up.status)}), reply_to=msg)


@client_app.train("apply")
def apply(msg: Message, context: Context) -> Message:
    from cdcca.runtime.protocol import DownlinkMessage, device_apply  # torch: only when a step runs

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
