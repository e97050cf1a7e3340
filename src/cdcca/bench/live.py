"""``cdcca bench live``: the deployed loop on one machine, measured as its clients see it.

It brings up the live fleet (``cdcca fleet up``: a SuperLink, one SuperNode and one device API per
device, TLS and node authentication), starts the ServerApp until stopped with its round triggers, and
replays a scenario's requests to every device's API at once with the official ``openai`` client, paced
open-loop (a request every 1/rate seconds whatever the answers take). Rounds happen when the outboxes
hold ``min_uploads`` samples or ``round_every_s`` after the last one; the APIs keep answering while the
cloud trains and follow each update between two batches. The same requests then go to a never-updated
device API (source-only). Per window of ``window`` requests per device it reports the online MC of the
answers as the clients got them, the source-only MC, latency p50/p99 and whether an update landed; over
the run: rounds, uploads queued / delivered / acknowledged / lost / duplicated, failed requests, bytes.
Everything it started is stopped at the end, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np

from cdcca.config import RunConfig, apply, flatten
from cdcca.data.scenario import scenario_chunks
from cdcca.data.stream import domain_images, resolve_sequence
from cdcca.fleet import deploy
from cdcca.fleet.devices import init_devices, start_apis
from cdcca.fleet.flower import READY_FILE, ROUND_LOG
from cdcca.fleet.processes import Pids
from cdcca.runtime.cloud_db import stored_sample_ids
from cdcca.runtime.queue_status import outbox_ids
from cdcca.trained_pair import run_stream


@dataclass
class Request:
    device: int
    index: int
    window: int
    domain: str
    question: str
    gold: str
    image_url: str


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def scenario_requests(cfg: RunConfig) -> list[list[Request]]:
    """Each device's requests in order: the scenario's rounds (a window each) per device, as PNG frames."""
    domains = resolve_sequence(cfg.data.domains)
    data = run_stream(domains)
    n_devices, per_device, window = cfg.fleet.devices, cfg.traffic.requests_per_device, cfg.scenario.size
    chunks = scenario_chunks(data, domains, cfg.scenario, n_devices, cfg.seed)
    frames: dict[str, np.ndarray] = {}
    out: list[list[Request]] = [[] for _ in range(n_devices)]
    for chunk in chunks:
        if all(len(reqs) >= per_device for reqs in out):
            break
        key = str(chunk.domain)
        if key not in frames:
            frames[key] = domain_images(chunk.domain, data)
        for i in range(n_devices):
            for q in chunk.question_ids[i::n_devices]:
                if len(out[i]) < per_device:
                    out[i].append(Request(i, len(out[i]), len(out[i]) // window, key, data.questions[q],
                                          data.answers[q], png_data_url(frames[key][data.image_ids[q]])))
    return out


def send_all(base_url: str, requests: list[Request], rate: float | None, concurrency: int,
             stop: threading.Event | None = None) -> list[dict]:
    """Send ``requests`` with the openai client, one every 1/``rate`` s (None: as fast as ``concurrency``
    allows), until ``stop`` is set; one result per request sent, failures included (never raised)."""
    stop = stop or threading.Event()
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="local-device", max_retries=0, timeout=300)

    def one(req: Request) -> dict:
        t0 = time.perf_counter()
        try:
            res = client.chat.completions.create(model="cdcca-device", messages=[{"role": "user", "content": [
                {"type": "text", "text": req.question}, {"type": "image_url", "image_url": {"url": req.image_url}}]}])
            extra = res.model_extra.get("cdcca", {})
            return {"ok": True, "answer": res.choices[0].message.content, "version": extra.get("adapter_version"),
                    "queued": bool(extra.get("queued_for_upload")), "sample_id": extra.get("sample_id"),
                    "latency_ms": (time.perf_counter() - t0) * 1000, "at": time.time()}
        except Exception as exc:                          # a failed request is a result, counted
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300],
                    "latency_ms": (time.perf_counter() - t0) * 1000, "at": time.time()}

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = []
        for j, req in enumerate(requests):
            if rate is not None and (wait := start + j / rate - time.perf_counter()) > 0:
                stop.wait(wait)
            if stop.is_set():
                break
            futures.append(pool.submit(one, req))
        return [{"device": r.device, "index": r.index, "window": r.window, "domain": r.domain, "gold": r.gold,
                 **f.result()} for r, f in zip(requests, futures)]


def start_reference(spec: deploy.FleetSpec, timeout: float, log: Callable[[str], None]) -> str:
    """A never-updated device API beside the fleet (same shipped adapters, its own state, in no round)."""
    dirs = {"reference": Path(spec.state) / "reference"}
    init_devices(dirs, spec.tiny, timeout)
    ports = start_apis(Path(spec.state), dirs, Pids(Path(spec.state)), 0, timeout, log)
    return f"http://127.0.0.1:{ports['reference']}/v1"


def run_live(cfg: RunConfig, out: Path, log: Callable[[str], None] = print, timeout: float = 3600) -> dict:
    """The whole live benchmark; ``out/fleet`` holds the fleet's state and logs, ``out/live.json`` the result."""
    out = Path(out)
    state = out / "fleet"
    if state.exists():
        deploy.down(state)
        shutil.rmtree(state)
    requests = scenario_requests(cfg)
    t_start = time.perf_counter()
    try:
        spec = deploy.up(state, cfg.fleet.devices, port=deploy.free_port(), tiny=cfg.model.tiny, apis=True, log=log)
        reference_url = start_reference(spec, 300, log)
        runner = Runner(state, apply(cfg, {"fleet.traffic": "api", "fleet.rounds": 0}), timeout)
        runner.wait_started()
        log(f"replaying {cfg.traffic.requests_per_device} requests per device at {cfg.traffic.rate}/s to "
            f"{cfg.fleet.devices} device APIs")
        t_traffic = time.perf_counter()
        per_device = replay(spec, requests, cfg)
        traffic_s = time.perf_counter() - t_traffic
        log("traffic done; asking the cloud to stop after its current round")
        deploy.request_stop(state)
        runner.join()
        log("the same requests to the never-updated device (source-only)")
        reference = send_all(reference_url, [r for reqs in requests for r in reqs], None, 8)
        result = summarize(cfg, spec, [r for rows in per_device for r in rows], reference, runner)
        result.update(traffic_s=round(traffic_s, 1), wall_s=round(time.perf_counter() - t_start, 1), config=flatten(cfg))
    finally:
        deploy.down(state)
    out.mkdir(parents=True, exist_ok=True)
    (out / "live.json").write_text(json.dumps(result, indent=2) + "\n")
    write_answers(out / "answers.jsonl", [r for rows in per_device for r in rows], reference)
    return result


def write_answers(path: Path, live: list[dict], reference: list[dict]) -> None:
    """Every answer served, one JSON line each, beside the never-updated device's to the same request: what
    the summary's windows and recovery were counted from, kept for a second look."""
    ref = {(r["device"], r["index"]): r for r in reference}
    keys = ("device", "index", "window", "domain", "ok", "answer", "gold", "version", "queued", "latency_ms", "at")
    with open(path, "w") as f:
        for r in sorted(live, key=lambda r: (r["device"], r["index"])):
            other = ref.get((r["device"], r["index"]), {})
            f.write(json.dumps({**{k: r.get(k) for k in keys}, "reference_answer": other.get("answer")}) + "\n")


def replay(spec: deploy.FleetSpec, requests: list[list[Request]], cfg: RunConfig) -> list[list[dict]]:
    """Every device's clients at once; Ctrl-C or a failure stops them all before it propagates."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(cfg.fleet.devices)
    try:
        futures = [pool.submit(send_all, f"http://127.0.0.1:{spec.apis[name]}/v1", reqs, cfg.traffic.rate,
                               cfg.traffic.concurrency, stop)
                   for name, reqs in zip(spec.devices, requests)]
        return [f.result() for f in futures]
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class Runner:
    """``cdcca fleet run --rounds 0`` in a thread: the ServerApp runs until asked to stop."""

    def __init__(self, state: Path, config: RunConfig, timeout: float):
        self.state, self.result, self.error = state, None, None
        self.thread = threading.Thread(target=self._run, args=(config, timeout), daemon=True)
        self.thread.start()

    def _run(self, config: RunConfig, timeout: float) -> None:
        try:
            self.result = deploy.run(self.state, config, timeout=timeout, echo=None)
        except Exception as exc:                          # reported in the summary, not lost in the thread
            self.error = str(exc)

    def wait_started(self, timeout: float = 300) -> None:
        """Until the ServerApp has loaded its models and seen every device (traffic sent before it would find no
        round to join, and the first round, which may react to the first shift, would spend its time loading)."""
        deadline = time.monotonic() + timeout
        while not (self.state / "cloud" / READY_FILE).is_file():
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise deploy.DeployError(f"the fleet run did not start: {self.error or 'timed out'}; "
                                         f"see {self.state / 'logs'}")
            time.sleep(0.5)

    def join(self, timeout: float = 1800) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise deploy.DeployError(f"the fleet run did not stop within {timeout:.0f} s of being asked to")

    def rounds(self) -> list[dict]:
        log = self.state / "cloud" / ROUND_LOG
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def summarize(cfg: RunConfig, spec: deploy.FleetSpec, live: list[dict], reference: list[dict], runner: Runner) -> dict:
    """Online vs source-only accuracy, latency per window, and the upload accounting of the whole run."""
    ref = {(r["device"], r["index"]): r for r in reference}
    windows = window_rows(cfg, live, ref)
    ok = [r for r in live if r["ok"]]
    upd = [r["latency_ms"] for r in ok if windows[r["window"]]["update_applied"]]
    other = [r["latency_ms"] for r in ok if not windows[r["window"]]["update_applied"]]
    rounds = runner.rounds()
    return {
        "online_mc": _mc(ok), "source_only_online_mc": _mc([r for r in reference if r["ok"]]),
        "requests": len(live), "failed_requests": len(live) - len(ok),
        "failed_reference_requests": sum(not r["ok"] for r in reference),
        "p50_ms": _pct(upd + other, 50), "p99_ms": _pct(upd + other, 99),
        "p99_ms_update_windows": _pct(upd, 99), "p99_ms_other_windows": _pct(other, 99),
        "rounds_completed": len(rounds), "round_triggers": [r.get("trigger") for r in rounds],
        "rounds_interrupted": sum(bool(r.get("interrupted")) for r in rounds),
        "round_timing": [{k: r.get(k) for k in ("round", "trigger", "interrupted", "started", "wall_s", "step_s")}
                         for r in rounds],
        "run_status": runner.result.status if runner.result else runner.error,
        **upload_accounting(spec, ok, rounds), **bytes_moved(spec), "windows": list(windows.values()),
        "domains": domain_recovery(live, ref),
    }


def domain_recovery(live: list[dict], ref: dict) -> dict[str, dict]:
    """Per domain, how soon clients saw the gain, beside the never-updated device on the same requests: the
    first window's online MC minus the reference's (``first_window_gain``), and the requests a device served in
    the domain before the first adapter version that gains at least half of what the domain's last window gains
    (``requests_to_half``, mean over devices; a version is what changes between answers, so this is counted to
    the request, not to the window), and the requests a device served with the adapters live when the domain
    began (``requests_to_first_update``, mean over devices): how long the fleet took to react, whatever the
    update then gained."""
    paired = [dict(r, right=r["answer"] == r["gold"], base=other["answer"] == other["gold"])
              for r in live if r["ok"] and (other := ref.get((r["device"], r["index"]), {})).get("ok")]
    out = {}
    for domain in dict.fromkeys(r["domain"] for r in sorted(paired, key=lambda r: (r["window"], r["index"]))):
        mine = [r for r in paired if r["domain"] == domain]
        windows = sorted({r["window"] for r in mine})
        out[domain] = {"first_window_gain": round(_gain([r for r in mine if r["window"] == windows[0]]), 4),
                       "requests_to_half": _requests_to_half(mine, _gain([r for r in mine if r["window"] == windows[-1]])),
                       "requests_to_first_update": _requests_to_first_update(mine)}
    return out


def _gain(rows: list[dict]) -> float:
    return float(np.mean([r["right"] for r in rows]) - np.mean([r["base"] for r in rows]))


def _requests_to_half(rows: list[dict], final_gain: float) -> float | None:
    """Mean over devices of the requests served (in order) before the first run of answers from one adapter
    version that gains ≥ ``final_gain`` / 2; a device that never gets there counts all its requests. None when
    the domain ends with no gain."""
    if final_gain <= 0:
        return None
    counts = []
    for device in sorted({r["device"] for r in rows}):
        served = sorted((r for r in rows if r["device"] == device), key=lambda r: r["index"])
        runs = [list(g) for _, g in groupby(served, key=lambda r: r.get("version"))]
        n = 0
        for run in runs:
            if _gain(run) >= final_gain / 2:
                break
            n += len(run)
        counts.append(n)
    return float(np.mean(counts))


def _requests_to_first_update(rows: list[dict]) -> float:
    """Mean over devices of the answers served before the first one from another adapter version than the
    domain's first answer (all of them when no update landed in the domain)."""
    counts = []
    for device in sorted({r["device"] for r in rows}):
        served = sorted((r for r in rows if r["device"] == device), key=lambda r: r["index"])
        counts.append(next((i for i, r in enumerate(served) if r.get("version") != served[0].get("version")), len(served)))
    return float(np.mean(counts))


def window_rows(cfg: RunConfig, live: list[dict], ref: dict) -> dict[int, dict]:
    by_window: dict[int, list[dict]] = {}
    answered: dict[tuple[int, int], list[dict]] = {}      # (device, window) → its answers, in request order
    for r in sorted(live, key=lambda r: r["index"]):
        by_window.setdefault(r["window"], []).append(r)
        if r["ok"]:
            answered.setdefault((r["device"], r["window"]), []).append(r)
    rows = {}
    for w, mine in sorted(by_window.items()):
        ok = [r for r in mine if r["ok"]]
        rows[w] = {"window": w, "domain": mine[0]["domain"], "requests": len(mine), "online_mc": _mc(ok),
                   "source_only_mc": _mc([ref[(r["device"], r["index"])] for r in mine
                                          if ref.get((r["device"], r["index"]), {}).get("ok")]),
                   "p50_ms": _pct([r["latency_ms"] for r in ok], 50), "p99_ms": _pct([r["latency_ms"] for r in ok], 99),
                   "versions": sorted({r["version"] for r in ok}), "failed": len(mine) - len(ok),
                   "update_applied": any(update_landed(answered, d, w) for d in range(cfg.fleet.devices))}
    return rows


def update_landed(answered: dict[tuple[int, int], list[dict]], device: int, window: int) -> bool:
    """An update landed on ``device`` during ``window``: its answers there came from more than one adapter
    version, counting the version its previous window ended on."""
    seen = {r["version"] for r in answered.get((device, window), [])}
    if before := answered.get((device, window - 1)):
        seen.add(before[-1]["version"])
    return len(seen) > 1


def upload_accounting(spec: deploy.FleetSpec, ok: list[dict], rounds: list[dict]) -> dict:
    """Every sample a client was told was queued is in the cloud or still in its device's outbox (else
    lost); no round's AKD trains a sample an earlier round trained (else duplicated; from the round log)."""
    queued = {r["sample_id"] for r in ok if r["queued"]}
    waiting = set().union(*(outbox_ids(Path(spec.state) / "devices" / d) for d in spec.devices))
    delivered = stored_sample_ids(Path(spec.state) / "cloud") & queued
    trained = [sid for r in rounds for d in r["devices"].values() for sid in d.get("trained_ids", [])]
    return {"uploads_queued": len(queued), "uploads_delivered": len(delivered),
            "uploads_acknowledged": len(delivered - waiting), "uploads_waiting": len(queued & waiting - delivered),
            "uploads_trained": len(set(trained)), "lost_uploads": len(queued - delivered - waiting),
            "duplicated_uploads": len(trained) - len(set(trained))}


def bytes_moved(spec: deploy.FleetSpec) -> dict:
    configs = [json.loads((Path(spec.state) / "devices" / d / "device.json").read_text()) for d in spec.devices]
    return {"bytes_up": sum(c["bytes_up"] for c in configs), "bytes_down": sum(c["bytes_down"] for c in configs)}


def _mc(rows: list[dict]) -> float | None:
    return round(float(np.mean([r["answer"] == r["gold"] for r in rows])), 4) if rows else None


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None
