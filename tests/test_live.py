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

from cdcca.bench.live import LiveConfig, Runner, run_live, scenario_requests, send_all, upload_accounting
from cdcca.fleet import deploy
from cdcca.fleet.processes import Pids

pytestmark = pytest.mark.integration


def test_bench_live_answers_every_request_and_loses_no_upload(tmp_path):
    cfg = LiveConfig(devices=2, requests_per_device=24, window=8, rate=6.0, min_uploads=8, round_every_s=10,
                     status_every_s=1.0, tiny=True)
    res = run_live(cfg, tmp_path, log=lambda _: None, timeout=600)
    assert res["failed_requests"] == 0 and res["requests"] == 48
    assert res["lost_uploads"] == 0 and res["duplicated_uploads"] == 0
    assert res["uploads_queued"] == res["uploads_delivered"] + res["uploads_waiting"] > 0
    assert res["rounds_completed"] >= 1 and res["run_status"] == "finished:completed"
    assert [w["window"] for w in res["windows"]] == [0, 1, 2] and res["bytes_up"] > 0
    assert json.loads((tmp_path / "live.json").read_text())["online_mc"] == res["online_mc"]
    assert not Pids(tmp_path / "fleet").alive()                   # everything it started is stopped


class Traffic:
    """Clients sending a device's requests in a background thread, as the live benchmark does."""

    def __init__(self, spec, requests):
        self.results: list[dict] = []
        self.threads = [threading.Thread(target=self._send, args=(spec, name, reqs), daemon=True)
                        for name, reqs in zip(spec.devices, requests)]
        for t in self.threads:
            t.start()

    def _send(self, spec, name, reqs):
        self.results += send_all(f"http://127.0.0.1:{spec.apis[name]}/v1", reqs, rate=4.0, concurrency=2)

    def join(self):
        for t in self.threads:
            t.join(300)


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _uplinked(state: Path, device: str) -> bool:
    db_path = state / "cloud" / "cloud.sqlite"
    if not db_path.is_file():
        return False
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM packets WHERE device_id=?", (device,)).fetchone()[0] > 0
        except sqlite3.OperationalError:
            return False


def test_a_supernode_killed_mid_round_under_traffic_loses_nothing_and_catches_up(tmp_path):
    state = tmp_path / "fleet"
    requests = scenario_requests(LiveConfig(devices=2, requests_per_device=160, window=40, tiny=True))
    try:
        spec = deploy.up(state, 2, port=deploy.free_port(), tiny=True, log=lambda _: None)
        runner = Runner(state, {"traffic": "api", "min-uploads": 8, "status-every-s": 1.0, "reply-timeout-s": 15.0,
                                "preset": "tiny"}, timeout=900)
        runner.wait_started()
        traffic = Traffic(spec, requests)
        _wait_for(lambda: _uplinked(state, "dev-1"), 240, "dev-1's first uplink")
        os.killpg(Pids(state).alive()["dev-1"]["pid"], signal.SIGKILL)         # mid-round: its update is not applied
        _wait_for(lambda: len(runner.rounds()) >= 1, 240, "the round without dev-1 to end")
        assert not runner.rounds()[0]["devices"].get("dev-1", {}).get("in_sync", False)
        deploy.restart_node(state, "dev-1", log=lambda _: None)
        caught_up = _wait_for(lambda: [r for r in runner.rounds()[1:] if r["devices"].get("dev-1", {}).get("in_sync")],
                              300, "a round that brings dev-1 back in sync")
        traffic.join()
        deploy.request_stop(state)
        runner.join(300)
        ok = [r for r in traffic.results if r["ok"]]
        assert len(ok) == len(traffic.results) == 320                          # the API answered every request
        accounting = upload_accounting(spec, ok, runner.rounds())
        assert accounting["lost_uploads"] == 0 and accounting["duplicated_uploads"] == 0
        # back in sync by the next round: the update it missed came late (Flower redelivers a message to a
        # node that reconnects) or was replayed by the cloud (catch-up); either way it matches its mirror
        assert caught_up[0]["round"] <= runner.rounds()[0]["round"] + 2
        assert all(d["in_sync"] for d in runner.rounds()[-1]["devices"].values())
    finally:
        deploy.down(state)


def test_the_cloud_killed_mid_round_and_restarted_under_traffic_loses_nothing(tmp_path):
    """The ServerApp dies after it has taken a round's uploads; a new run picks the cloud state up: the
    devices re-send what was never acknowledged (counted once) and catch up on the update they missed."""
    from cdcca.fleet.processes import pids_with_args

    state = tmp_path / "fleet"
    requests = scenario_requests(LiveConfig(devices=2, requests_per_device=160, window=40, tiny=True))
    config = {"traffic": "api", "min-uploads": 8, "status-every-s": 1.0, "reply-timeout-s": 15.0, "preset": "tiny"}
    try:
        spec = deploy.up(state, 2, port=deploy.free_port(), tiny=True, log=lambda _: None)
        first = Runner(state, config, timeout=900)
        first.wait_started()
        traffic = Traffic(spec, requests)
        _wait_for(lambda: _uplinked(state, "dev-1") and _uplinked(state, "dev-2"), 240, "the first uplinks")
        for pid in pids_with_args("flwr-serverapp", spec.address):
            os.kill(pid, signal.SIGKILL)                                      # the cloud dies mid-round
        second = Runner(state, config, timeout=900)                           # and comes back on its state
        rows = _wait_for(lambda: [r for r in second.rounds() if all(d["in_sync"] for d in r["devices"].values())
                                  and len(r["devices"]) == 2], 300, "a round with both devices in sync again")
        traffic.join()
        deploy.request_stop(state)
        second.join(300)
        ok = [r for r in traffic.results if r["ok"]]
        assert len(ok) == len(traffic.results) == 320                          # serving never stopped
        accounting = upload_accounting(spec, ok, second.rounds())
        assert accounting["lost_uploads"] == 0 and accounting["duplicated_uploads"] == 0
        assert rows and second.result is not None and second.result.ok
    finally:
        deploy.down(state)
