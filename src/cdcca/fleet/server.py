"""The cloud's side of the cdcca Flower app: the ServerApp, one helper per step of a round.

Rounds follow each other, or — with ``round-every-s`` / ``min-uploads`` in the run config — wait for
something to learn: a round starts when the devices' outboxes hold ``min-uploads`` samples (asked with a
cheap ``query.status`` every ``status-every-s``) or ``round-every-s`` after the last one began, whichever
comes first, and only when something is queued. ``rounds=0`` runs until a file named ``stop`` appears in
the cloud state dir (``cdcca fleet down`` and ``cdcca bench live`` write it); the round in progress ends
first. A regular round gives way to a shift: while its cloud step trains, the outboxes are asked every
``status-every-s`` too, and when a device reports a shift the training stops (nothing of it is committed),
and the shift's round starts at once, carrying the stopped round's acknowledgements (``fleet.shift_interrupts``).
Serving never waits for a round: each device's API answers with its current adapters while the
cloud trains, and follows the adapter store when the update lands.

Each round appends one JSON line to ``CLOUD_DIR/fleet-rounds.jsonl``: per device what moved, whether it
equals its cloud mirror, the seconds per step and what started the round.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import closing, contextmanager
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from cdcca import wire
from cdcca.config import RunConfig
from cdcca.fleet.flower import READY_FILE, ROUND_LOG, STOP_FILE, _dict, run_config
from cdcca.trained_pair import run_answers, serve

if TYPE_CHECKING:     # the protocol imports torch; the app imports it only when a step runs
    from cdcca.runtime.protocol import DownlinkMessage, UplinkMessage

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    rounds = RoundLog(Path(cfg.fleet.cloud_dir) / ROUND_LOG)
    stop = Path(cfg.fleet.cloud_dir) / STOP_FILE       # removed by `cdcca fleet run` before it starts a run
    with closing(open_cloud(cfg)) as cloud:
        wait_for_nodes(grid, cfg)
        (Path(cfg.fleet.cloud_dir) / READY_FILE).touch()   # models loaded, devices connected: traffic may start
        rnd = first = rounds.next_round()
        trigger = RoundTrigger(cfg, lambda: queued_uploads(grid, rnd, cfg), stop)
        carried: dict[int, list[str]] | None = None    # a round a shift stopped: its acknowledgements
        while cfg.fleet.rounds == 0 or rnd < first + cfg.fleet.rounds:
            reason = trigger.wait(shift_known=carried is not None)
            if reason is None:
                break
            carried = run_round(grid, cloud, rnd, cfg, rounds, reason, carried or {})
            rnd += 1
        if carried:
            send_downlinks(grid, cloud, {}, with_carried_acks({}, carried), rnd, cfg)


def run_round(grid: Grid, cloud, rnd: int, cfg: RunConfig, rounds: RoundLog, reason: str,
              carried: dict[int, list[str]] | None = None) -> dict[int, list[str]] | None:
    """One round for every connected device: uplinks, the cloud's step, downlinks, statuses, the log line.
    ``carried``: acknowledgements a stopped round left, sent with this round's downlinks. When a shift report
    stops this round, no downlink is sent and it returns its acknowledgements (with ``carried``) for the
    shift's round, which starts next; else None."""
    clock = Stopwatch()
    reacting = reason == "shift"
    with clock("uplink"):
        uplinks = collect_uplinks(grid, rnd, cfg, reacting=reacting)             # query.uplink
    watching = cfg.fleet.shift_interrupts and cfg.fleet.triggered and cfg.fleet.early_round > 0 and not reacting
    with clock("cloud"), ShiftWatch(lambda: queued_uploads(grid, rnd, cfg), cfg.fleet.status_every_s, watching) as shift:
        join_group(cloud, uplinks, cfg.fleet.group)
        trained: dict[int, list[str]] = {}
        downlinks = cloud_rounds(cloud, uplinks, trained, fresh_only=reacting,    # receive → AKD → DWC
                                 should_stop=shift.reported.is_set)
    interrupted = shift.reported.is_set()
    if interrupted:        # the devices stay where their uplinks found them; a finished update is caught up next round
        row = check_mirrors(cloud, rnd, uplinks, {}, set(), {nid: up.status for nid, up in uplinks.items()}, trained)
        rounds.append({**row, "trigger": reason, "interrupted": True, **clock.record()})
        log(INFO, "round %s (%s) stopped by a shift report after %.1f s", rnd, reason, clock.total())
        return merge_acks(carried or {}, {nid: d.acked for nid, d in downlinks.items()})
    downlinks = with_carried_acks(downlinks, carried or {})
    with clock("apply"):
        resynced, applied = send_downlinks(grid, cloud, uplinks, downlinks, rnd, cfg)   # train.apply (+ resync)
    with clock("status"):
        statuses = collect_status(grid, rnd, cfg, applied)                       # evaluate (the others)
    row = check_mirrors(cloud, rnd, uplinks, downlinks, resynced, statuses, trained)
    rounds.append({**row, "trigger": reason, "interrupted": False, **clock.record()})
    log(INFO, "round %s (%s): %s/%s devices in sync with their cloud mirror (%.1f s)",
        rnd, reason, row["in_sync"], len(row["devices"]), clock.total())
    return None


def with_carried_acks(downlinks: dict[int, DownlinkMessage], carried: dict[int, list[str]]) -> dict[int, DownlinkMessage]:
    """``downlinks`` with a stopped round's acknowledgements put first; a node with nothing else gets them alone."""
    from cdcca.runtime.protocol import DownlinkMessage  # torch: only when a round runs

    out = dict(downlinks)
    for nid, ids in carried.items():
        d = out.get(nid) or DownlinkMessage(acked=[])
        out[nid] = DownlinkMessage(list(ids) + d.acked, d.packets, d.caught_up)
    return out


def merge_acks(*acks: dict[int, list[str]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for a in acks:
        for nid, ids in a.items():
            out.setdefault(nid, []).extend(ids)
    return out


class ShiftWatch:
    """While a regular round's cloud step runs: asks ``queued()`` (as :class:`RoundTrigger` does) every
    ``every_s`` on a thread of its own and sets ``reported`` when a device reports a shift. The Grid is
    only used by this thread while the step runs: leaving the block waits for a question in flight."""

    def __init__(self, queued: Callable[[], int | tuple[int, int]], every_s: float, active: bool = True):
        self.queued, self.every_s, self.active = queued, every_s, active
        self.reported, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="shift-watch", daemon=True)

    def __enter__(self) -> ShiftWatch:
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        while not self._done.is_set():
            try:
                q = self.queued()
            except Exception as exc:              # a failed question must not end the round: the next one may answer
                log(WARNING, "shift watch: asking the outboxes failed: %s", exc)
                q = 0
            if isinstance(q, tuple) and q[1] > 0 and not self._done.is_set():
                self.reported.set()
                return
            self._done.wait(self.every_s)


class RoundTrigger:
    """When the next round starts: at once (no trigger set), or on time / queued uploads / a device's shift report
    (``fleet.early_round`` > 0: a round as soon as a device that reported a shift has queued half an early round
    since); None = stop.
    ``queued()``: the samples queued over the fleet, and how many devices report a shift (or just the samples)."""

    def __init__(self, cfg: RunConfig, queued: Callable[[], int | tuple[int, int]], stop: Path,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.queued, self.stop, self.sleep, self.clock = cfg, queued, stop, sleep, clock
        self.last_start = clock()

    def wait(self, shift_known: bool = False) -> str | None:
        """The next round's reason; ``shift_known``: a shift report stopped the last round, start its round now."""
        if self.stop.exists():
            return None
        if shift_known:
            self.last_start = self.clock()
            return "shift"
        if not self.cfg.fleet.triggered:
            return "next"
        while not self.stop.exists():
            n, shifted = (q if isinstance(q := self.queued(), tuple) else (q, 0))
            enough = 0 < self.cfg.fleet.min_uploads <= n
            due = 0 < self.cfg.fleet.round_every_s <= self.clock() - self.last_start
            shift = self.cfg.fleet.early_round > 0 and shifted > 0
            if n > 0 and (enough or due or shift):
                self.last_start = self.clock()
                return "shift" if shift else "uploads" if enough else "time"     # a shift names its round
            self.sleep(self.cfg.fleet.status_every_s)
        return None


def queued_uploads(grid: Grid, rnd: int, cfg: RunConfig) -> tuple[int, int]:
    """Samples waiting in every connected device's outbox (pending or in flight), and how many devices report a
    shift no uplink has carried samples from yet and have half an early round queued since, from ``query.status``."""
    msgs = [_to(nid, "query.status", rnd) for nid in grid.get_node_ids()]
    return tally_queues((_dict(reply.content["queue"])
                         for msg, reply in exchange(grid, msgs, cfg, timeout_s=max(30.0, 4 * cfg.fleet.status_every_s))
                         if usable(msg, reply, "queue")), cfg.fleet.early_round)


def tally_queues(queues: Iterable[dict[str, Any]], early_round: int = 1) -> tuple[int, int]:
    """(samples queued over the fleet, devices whose shift report waits with enough samples queued since it to
    learn from: half of ``early_round``, the newest samples a shift round takes, and at least one)."""
    need = max(1, early_round // 2)
    total = shifted = 0
    for q in queues:
        total += int(q.get("pending", 0)) + int(q.get("in_flight", 0))
        shifted += int(q.get("shift_at", 0)) > 0 and int(q.get("shift_queued", need)) >= need   # (no count: an older device)
    return total, shifted


def open_cloud(cfg: RunConfig):
    from cdcca.model.placement import check_torch_device  # torch: the app imports it when the cloud opens
    from cdcca.runtime.cloud import CloudRuntime  # (the same)

    serve(cfg.model)
    cloud = CloudRuntime.open(cfg.fleet.cloud_dir, tiny=cfg.model.tiny,
                              candidates=run_answers(cfg.data.domains, cfg.model.tiny),
                              akd=cfg.akd, dwc=cfg.dwc, torch_device=check_torch_device(cfg.torch_device))
    cloud.load_models()          # before the devices connect: the first round may be reacting to a shift
    return cloud


def wait_for_nodes(grid: Grid, cfg: RunConfig) -> None:
    deadline = time.monotonic() + cfg.fleet.node_wait_s
    while (n := len(list(grid.get_node_ids()))) < cfg.fleet.min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} of {cfg.fleet.min_nodes} devices connected after {cfg.fleet.node_wait_s:.0f} s; "
                               f"are the SuperNodes running and registered?")
        time.sleep(cfg.fleet.poll_s)


def exchange(grid: Grid, messages: list[Message], cfg: RunConfig,
             timeout_s: float | None = None) -> list[tuple[Message, Message | None]]:
    """Push ``messages`` and pull until each has a reply or the timeout passes (no reply: None).

    Replies are matched by ``reply_to_message_id``: errors made by the SuperLink itself (node gone)
    come from node 1, not from the node asked."""
    ids = list(grid.push_messages(messages)) if messages else []
    waiting = {mid for mid in ids if mid}
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + (cfg.fleet.reply_timeout_s if timeout_s is None else timeout_s)
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            replies[reply.metadata.reply_to_message_id] = reply
            waiting.discard(reply.metadata.reply_to_message_id)
        if waiting:
            time.sleep(cfg.fleet.poll_s)
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


def collect_uplinks(grid: Grid, rnd: int, cfg: RunConfig, reacting: bool = False) -> dict[int, UplinkMessage]:
    """query.uplink to every connected node: each device serves its round and uploads its uncertain samples;
    ``reacting`` (a round a shift report started): only its newest ``fleet.early_round`` samples, so the first
    update after a shift is small and learns the new domain (the backlog waits for the next round)."""
    from cdcca.runtime.protocol import UplinkMessage  # torch: only when a round runs

    names = {n.node_id: n.name for n in grid.get_nodes()}
    ask = ConfigRecord(uplink_ask(rnd, cfg, reacting))
    uplinks = {}
    for msg, reply in exchange(grid, [_to(nid, "query.uplink", rnd, config=ask) for nid in names], cfg):
        if not usable(msg, reply, "uplink"):
            continue
        nid, up = msg.metadata.dst_node_id, _dict(reply.content["uplink"])
        device_id = str(up.get("device-id", ""))
        if not claims_own_name(nid, names[nid], device_id, up.get("packet")):
            continue
        uplinks[nid] = UplinkMessage(device_id, up.get("packet"), status=_dict(reply.content.get("status")),
                                     served=_dict(reply.content.get("served")))
    return uplinks


def uplink_ask(rnd: int, cfg: RunConfig, reacting: bool) -> dict[str, Any]:
    """What query.uplink asks of a device: its oldest ``fleet.max_samples``, or in a round a shift report
    started its newest ``fleet.early_round``."""
    if reacting:
        return {"round": rnd, "max-samples": cfg.fleet.early_round, "newest": True}
    return {"round": rnd, "max-samples": cfg.fleet.max_samples}


def claims_own_name(node_id: int, registered: str, device_id: str, packet: bytes | None) -> bool:
    """A node speaks only for the device it was registered as, and its packet for that device too."""
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


def cloud_rounds(cloud, uplinks: dict[int, UplinkMessage], trained: dict[int, list[str]] | None = None,
                 fresh_only: bool = False, should_stop: Callable[[], bool] | None = None) -> dict[int, DownlinkMessage]:
    """The cloud's step of the round for every device (all uploads committed first, so a fleet group's
    student sees all its members); a device whose packet is rejected is left out. ``fresh_only`` and
    ``should_stop`` as for :func:`~cdcca.runtime.protocol.cloud_round`."""
    from cdcca.runtime.protocol import cloud_round  # torch: only when a round runs

    def rejected(_nid: int, up: UplinkMessage, exc: Exception) -> None:
        log(WARNING, "%s: uplink rejected, nothing acknowledged: %s", up.device_id, exc)

    return cloud_round(cloud, uplinks, on_reject=rejected, trained=trained, fresh_only=fresh_only,
                       should_stop=should_stop)


def send_downlinks(grid: Grid, cloud, uplinks: dict[int, UplinkMessage], downlinks: dict[int, DownlinkMessage],
                   rnd: int, cfg: RunConfig) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """train.apply to each device alone; a device on a stale base gets a dense resync. Returns the resynced
    nodes and the status each device reported after applying (its version and hash now)."""
    msgs = [_to(nid, "train.apply", rnd, downlink=ConfigRecord({"acked": d.acked, "packets": d.packets}))
            for nid, d in downlinks.items() if d.acked or d.packets]
    stale, statuses = [], {}
    for msg, reply in exchange(grid, msgs, cfg):
        if usable(msg, reply, "status"):
            if "resync" in reply.content:
                stale.append(msg.metadata.dst_node_id)
                log(INFO, "%s needs a full resync: %s", uplinks[stale[-1]].device_id, reply.content["resync"]["reason"])
            else:
                statuses[msg.metadata.dst_node_id] = _dict(reply.content["status"])
    from cdcca.runtime.protocol import cloud_resync  # torch: only when a round runs

    resync = [_to(nid, "train.apply", rnd, downlink=ConfigRecord(
        {"acked": [], "packets": cloud_resync(cloud, uplinks[nid].device_id).packets})) for nid in stale]
    for msg, reply in exchange(grid, resync, cfg):
        if usable(msg, reply, "status"):
            statuses[msg.metadata.dst_node_id] = _dict(reply.content["status"])
    return set(stale), statuses


def collect_status(grid: Grid, rnd: int, cfg: RunConfig, known: dict[int, dict[str, Any]] | None = None
                   ) -> dict[int, dict[str, Any]]:
    """evaluate on every connected node not in ``known`` (the statuses the apply step already returned: one
    process start per device saved): each reports version, hash, outbox and byte counters."""
    known = dict(known or {})
    msgs = [_to(nid, "evaluate", rnd, config=ConfigRecord({"round": rnd})) for nid in grid.get_node_ids()
            if nid not in known]
    return {**known, **{msg.metadata.dst_node_id: _dict(reply.content["status"])
                        for msg, reply in exchange(grid, msgs, cfg) if usable(msg, reply, "status")}}


def check_mirrors(cloud, rnd: int, uplinks: dict[int, UplinkMessage], downlinks: dict[int, DownlinkMessage],
                  resynced: set[int], statuses: dict[int, dict[str, Any]],
                  trained: dict[int, list[str]] | None = None) -> dict[str, Any]:
    """One round's record: per device what moved, what AKD trained on and whether it now equals its mirror."""
    trained = trained or {}
    devices = {}
    for nid in sorted(set(statuses) | set(uplinks)):     # a device that went silent after its uplink is kept
        st, up, down = statuses.get(nid, {}), uplinks.get(nid), downlinks.get(nid)
        device_id = str(st.get("device_id") or (up.device_id if up else ""))
        in_sync = bool(st) and st.get("hash") == cloud.mirror_hash(device_id)
        if not in_sync:
            log(WARNING, "round %s: %s (node %s) %s", rnd, device_id, nid,
                "differs from its cloud mirror" if st else "sent no status after its uplink")
        devices[device_id] = {
            "node_id": nid, "version": st.get("version"), "hash": st.get("hash"), "in_sync": in_sync,
            "reported": bool(st),
            "uploaded": len(down.acked) if down else 0, "trained_ids": trained.get(nid, []),
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
        self.start, self.started = time.perf_counter(), time.time()
        self.laps: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.laps[name] = round(time.perf_counter() - t0, 2)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)

    def record(self) -> dict[str, Any]:
        """The round log's timing fields: when it started, its wall seconds, the seconds per step."""
        return {"started": self.started, "wall_s": self.total(), "step_s": self.laps}


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
