"""The live fleet under client traffic, with real processes on 127.0.0.1 and tiny models: a SuperLink, a
SuperNode and a device API per device, the ServerApp running until stopped, rounds on their trigger.

Run them alone with ``pytest -m integration tests/test_live.py``.
"""

import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from cdcca.bench.live import Runner, run_live, scenario_requests, send_all, upload_accounting
from cdcca.config import resolve
from cdcca.fleet import deploy
from cdcca.fleet.processes import Pids

pytestmark = pytest.mark.integration


def test_bench_live_answers_every_request_and_loses_no_upload(tmp_path):
    cfg = resolve("tiny", sets=["fleet.devices=2", "traffic.requests_per_device=24", "stream.round_size=8", "traffic.rate=6.0",
                                "fleet.min_uploads=8", "fleet.round_every_s=10", "fleet.status_every_s=1.0"])
    res = run_live(cfg, tmp_path, log=lambda _: None, timeout=600)
    assert res["failed_requests"] == 0 and res["requests"] == 48
    assert res["lost_uploads"] == 0 and res["duplicated_uploads"] == 0
    assert res["uploads_queued"] == res["uploads_delivered"] + res["uploads_waiting"] > 0
    assert res["rounds_completed"] >= 1 and res["run_status"] == "finished:completed"
    assert [w["window"] for w in res["windows"]] == [0, 1, 2] and res["bytes_up"] > 0
    assert json.loads((tmp_path / "live.json").read_text())["online_mc"] == res["online_mc"]
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 48 and all(a["answer"] and a["reference_answer"] for a in answers)   # every answer, kept
    assert res["rounds_interrupted"] == 0 and len(res["round_timing"]) == res["rounds_completed"]
    assert not Pids(tmp_path / "fleet").alive()                   # everything it started is stopped


class Traffic:
    """Clients sending a device's requests in a background thread, as the live benchmark does."""

    def __init__(self, spec, requests):
        self.results: list[dict] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(spec, name, reqs), daemon=True)
                        for name, reqs in zip(spec.devices, requests)]
        for t in self.threads:
            t.start()

    def _send(self, spec, name, reqs):
        self.results += send_all(f"http://127.0.0.1:{spec.apis[name]}/v1", reqs, rate=4.0, concurrency=2,
                                 stop=self.stop)

    def join(self):
        """Stop sending; wait for the requests in flight."""
        self.stop.set()
        for t in self.threads:
            t.join(300)


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _packets(state: Path, device: str) -> int:
    """Uplink packets the cloud has stored from ``device`` (it stores one as soon as it receives it)."""
    db_path = state / "cloud" / "cloud.sqlite"
    if not db_path.is_file():
        return 0
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM packets WHERE device_id=?", (device,)).fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def _in_sync_round(runner: Runner, after: int, device: str | None = None) -> list[dict]:
    return [r for r in runner.rounds() if r["round"] > after and len(r["devices"]) == 2
            and all(d["in_sync"] for name, d in r["devices"].items() if device in (None, name))]


def test_a_supernode_then_the_cloud_killed_mid_round_under_traffic_lose_nothing(tmp_path):
    """Clients keep sending while, first, dev-1's SuperNode is killed in the middle of a round and started
    again, and then the ServerApp is killed in the middle of a round and a new run takes its cloud state
    over: every request is answered, no upload is lost or trained twice, and the devices end in sync with
    their cloud mirrors (the missed update arrives late — Flower redelivers a message to a node that
    comes back — or is replayed by the cloud)."""
    from cdcca.fleet.processes import pids_with_args

    state = tmp_path / "fleet"
    requests = scenario_requests(resolve(sets=["fleet.devices=2", "traffic.requests_per_device=2000"]))   # 1,280 each
    config = resolve("tiny", sets=["fleet.rounds=0", "fleet.min_uploads=8", "fleet.status_every_s=1.0",
                                   "fleet.reply_timeout_s=15.0"])
    try:
        spec = deploy.up(state, 2, port=deploy.free_port(), tiny=True, log=lambda _: None)
        first = Runner(state, config, timeout=900)
        first.wait_started()
        traffic = Traffic(spec, requests)
        _wait_for(lambda: _packets(state, "dev-1") > 0, 240, "dev-1's first uplink")
        os.killpg(Pids(state).alive()["dev-1"]["pid"], signal.SIGKILL)       # a device dies mid-round
        _wait_for(lambda: first.rounds(), 240, "the round without dev-1 to end")
        assert not first.rounds()[0]["devices"].get("dev-1", {}).get("in_sync", False)
        deploy.restart_node(state, "dev-1", log=lambda _: None)
        back = _wait_for(lambda: _in_sync_round(first, 0, "dev-1"), 300, "a round with dev-1 back in sync")[0]

        seen = _packets(state, "dev-2")
        _wait_for(lambda: _packets(state, "dev-2") > seen, 240, "the next round's uplinks")
        cloud_apps = pids_with_args("flwr-serverapp", spec.address)
        assert cloud_apps, "no ServerApp process found to kill"
        for pid in cloud_apps:
            os.kill(pid, signal.SIGKILL)                                        # the cloud dies mid-round
        second = Runner(state, config, timeout=900)                             # and comes back on its state
        last = max(r["round"] for r in second.rounds())
        _wait_for(lambda: _in_sync_round(second, last), 300, "a round of the new run with both devices in sync")
        traffic.join()
        deploy.request_stop(state)
        second.join(300)

        ok = [r for r in traffic.results if r["ok"]]
        assert len(ok) == len(traffic.results) > 400                           # the APIs answered every request
        accounting = upload_accounting(spec, ok, second.rounds())
        assert accounting["lost_uploads"] == 0 and accounting["duplicated_uploads"] == 0
        assert back["round"] <= first.rounds()[0]["round"] + 2 and second.result is not None and second.result.ok
        assert all(d["in_sync"] for d in second.rounds()[-1]["devices"].values())
    finally:
        deploy.down(state)


def test_each_domain_reports_its_first_window_gain_and_the_requests_to_half_of_it():
    """Two devices, two domains of two windows, 8 requests a window (4 a device). In pixelate's first window
    device 0's update lands after its 2nd request, device 1's after its 3rd: the updated answers gain +100
    over the never-updated device, the others nothing, so half of the last window's +75 is reached after
    2 and 3 requests (2.5 on average) although the window as a whole gains only +37.5; those updates are the
    first of the domain too. jpeg gains at once, with the adapters it began with."""
    from cdcca.bench.live import domain_recovery

    plan = []                    # (window, domain, device, version, right, reference right)
    for device, lands in ((0, 2), (1, 3)):
        plan += [(0, "pixelate:5", device, int(k >= lands), int(k >= lands), 0) for k in range(4)]
        plan += [(1, "pixelate:5", device, 1, int(k < 3), 0) for k in range(4)]
        plan += [(w, "jpeg:5", device, 2, int(k < 3), 0) for w in (2, 3) for k in range(4)]
    live, ref, index = [], {}, {0: 0, 1: 0}
    for w, domain, device, version, right, base in sorted(plan, key=lambda p: p[0]):
        i = index[device] = index[device] + 1
        live.append({"device": device, "index": i, "window": w, "domain": domain, "ok": True, "answer": "a",
                     "gold": "a" if right else "b", "version": version})
        ref[(device, i)] = {"ok": True, "answer": "a", "gold": "a" if base else "b"}
    out = domain_recovery(live, ref)
    assert out["pixelate:5"] == {"first_window_gain": 0.375, "requests_to_half": 2.5, "requests_to_first_update": 2.5}
    assert out["jpeg:5"] == {"first_window_gain": 0.75, "requests_to_half": 0.0,
                             "requests_to_first_update": 8.0}     # no update landed in it: all 8 per device
