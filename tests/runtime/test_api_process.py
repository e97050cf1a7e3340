
"""`cdcca device api` as a real process on 127.0.0.1: the official openai client asks about an image,
an uncertain request lands in the outbox (`cdcca device status`), an update applied with `cdcca device
apply` answers the next request; and a bounded schemathesis run over the served schema finds no 5xx."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from tests.conftest import CANDIDATES
from tests.runtime.test_api import png_data_url

from cdcca.akd.config import LabelPhase


def cdcca(*args: str, env=None) -> str:
    exe = shutil.which("cdcca", path=os.path.dirname(sys.executable)) or "cdcca"
    return subprocess.run([exe, *args], check=True, capture_output=True, text=True, env=env, timeout=120).stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cdcca.fleet.deploy import free_port

    root = tmp_path_factory.mktemp("api")
    state = root / "dev"
    cdcca("device", "init", "--state", str(state), "--device", "dev-0", "--tiny")
    port = free_port()
    exe = shutil.which("cdcca", path=os.path.dirname(sys.executable)) or "cdcca"
    log = (root / "api.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([exe, "device", "api", "--state", str(state), "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "api.log").read_text()) from None
            time.sleep(0.1)
    yield {"base": base, "state": state, "root": root}
    proc.terminate()
    proc.wait(timeout=20)


def ask(client, seed=0):
    return client.chat.completions.create(
        model="cdcca-device",
        messages=[{"role": "user", "content": [{"type": "text", "text": "what color is the shape?"},
                                               {"type": "image_url", "image_url": {"url": png_data_url(seed)}}]}])


def test_openai_client_outbox_and_update(server):
    from openai import OpenAI

    from cdcca.akd.distill import AKDConfig
    from cdcca.downlink import DWCConfig
    from cdcca.runtime.cloud import CloudRuntime
    from cdcca.runtime.device import DeviceRuntime

    client = OpenAI(base_url=server["base"] + "/v1", api_key="not-needed")
    assert [m.id for m in client.models.list()] == ["cdcca-device"]
    replies = [ask(client, seed) for seed in range(3)]
    assert all(r.choices[0].message.content in CANDIDATES for r in replies)
    ext = [r.model_extra["cdcca"] for r in replies]
    assert any(e["queued_for_upload"] for e in ext) and all(e["adapter_version"] == 0 for e in ext)
    assert json.loads(cdcca("device", "status", "--state", str(server["state"])))["outbox"] == \
        sum(e["queued_for_upload"] for e in ext)

    # the cloud trains on the uploads; the update is applied by a separate `cdcca device apply` process
    cloud = CloudRuntime.open(server["root"] / "cloud", tiny=True, akd=AKDConfig(labels=LabelPhase(epochs=1, batch_size=4)),
                              dwc=DWCConfig(budget_bytes=16 * 1024))
    dev = DeviceRuntime.open(server["state"])
    try:
        dev.ack_uplink(cloud.receive(dev.collect_uplink()))
        (server["root"] / "update.bin").write_bytes(cloud.run_round("dev-0"))
    finally:
        dev.close()
        cloud.close()
    cdcca("device", "apply", str(server["root"] / "update.bin"), "--state", str(server["state"]))
    assert ask(client).model_extra["cdcca"]["adapter_version"] == 1


def test_fuzzing_the_served_schema_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server["base"] + "/openapi.json")
    failures, calls = [], []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/models", "/healthz"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(base_url=server["base"], timeout=30)
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))

        fuzz()
    assert not failures, failures
    assert len(calls) >= 40
