
"""The device's OpenAI-compatible API on a tiny device: answers, the outbox, following an update
applied by another process, and a clear JSON error with the right status for every bad input."""

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tests.conftest import CANDIDATES

from cdcca.akd.config import LabelPhase


def png_data_url(seed=0, size=64) -> str:
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(question="what color is the shape?", url=None, **extra) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url or png_data_url()}}]
    return {"model": "cdcca-device", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def state(tmp_path):
    from cdcca.runtime.device import DeviceRuntime

    DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True).close()
    return tmp_path / "dev"


@pytest.fixture
def client(state, tmp_path):
    from cdcca.runtime.api import create_app

    (tmp_path / "photos").mkdir()
    with TestClient(create_app(state, allow_files=tmp_path / "photos")) as c:
        yield c


def test_a_question_about_an_image_gets_a_chat_completion(client):
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] in CANDIDATES
    ext = body["cdcca"]
    assert 0 < ext["confidence"] <= 1 and ext["adapter_version"] == 0 and isinstance(ext["queued_for_upload"], bool)


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "cdcca-device"
    assert client.get("/healthz").json() == {"status": "ok", "device_id": "dev-0", "adapter_version": 0}


def test_uncertain_requests_land_in_the_durable_outbox(client, state):
    from cdcca.runtime.device import DeviceRuntime

    queued = [client.post("/v1/chat/completions", json=chat(url=png_data_url(i))).json()["cdcca"] for i in range(4)]
    dev = DeviceRuntime.open(state)
    try:
        assert dev.status()["outbox"] == sum(q["queued_for_upload"] for q in queued) > 0   # a random model is unsure
    finally:
        dev.close()


def test_an_update_applied_by_another_process_answers_the_next_request(client, state, tmp_path):
    from cdcca.akd.distill import AKDConfig
    from cdcca.downlink import DWCConfig
    from cdcca.runtime.cloud import CloudRuntime
    from cdcca.runtime.device import DeviceRuntime

    client.post("/v1/chat/completions", json=chat())
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True, akd=AKDConfig(labels=LabelPhase(epochs=1, batch_size=4)),
                              dwc=DWCConfig(budget_bytes=16 * 1024))
    dev = DeviceRuntime.open(state)                 # a second handle, as `cdcca device apply` would open
    try:
        dev.ack_uplink(cloud.receive(dev.collect_uplink()))
        dev.apply(cloud.run_round("dev-0"))
    finally:
        dev.close()
        cloud.close()
    r = client.post("/v1/chat/completions", json=chat())
    assert r.json()["cdcca"]["adapter_version"] == 1
    assert client.get("/healthz").json()["adapter_version"] == 1


def test_a_local_file_inside_the_allowed_folder_is_read(client, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "photos" / "a.png")
    assert client.post("/v1/chat/completions", json=chat(url="a.png")).status_code == 200
    assert client.post("/v1/chat/completions", json=chat(url=str(tmp_path / "photos" / "a.png"))).status_code == 200


@pytest.mark.parametrize("body, status, code", [
    (chat(url="data:image/png;base64," + base64.b64encode(b"not an image at all").decode()), 400, "not_an_image"),
    (chat(url="data:image/png;base64,@@@"), 400, "bad_base64"),
    (chat(url="data:image/png,rawbytes"), 400, "bad_data_url"),
    (chat(url="https://example.com/cat.png"), 400, "remote_url"),
    (chat(question=" "), 400, "no_question"),
    (chat(question="why? " * 300), 413, "text_too_long"),
    (chat(stream=True), 400, "stream_unsupported"),
    ({"messages": [{"role": "system", "content": "hi"}]}, 400, "no_user_message"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}]}]}, 400, "need_one_image"),
    ({"messages": []}, 422, "invalid_body"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "invalid_body"),
    ({"nothing": 1}, 422, "invalid_body"),
])
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(client, body, status, code):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200


def test_a_body_that_is_not_json_is_422(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_body"


def test_an_image_over_the_limit_is_413_and_says_the_limit(client, monkeypatch):
    import cdcca.runtime.api as api

    monkeypatch.setattr(api, "MAX_IMAGE_BYTES", 1000)
    r = client.post("/v1/chat/completions", json=chat(url=png_data_url(size=256)))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_a_body_over_the_limit_is_413(client, monkeypatch):
    import cdcca.runtime.api as api

    monkeypatch.setattr(api, "MAX_BODY_BYTES", 100)
    assert client.post("/v1/chat/completions", json=chat()).status_code == 413


def test_paths_outside_the_allowed_folder_are_403(client, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    for url in ("../secret.png", str(tmp_path / "secret.png"), "file:///etc/passwd"):
        r = client.post("/v1/chat/completions", json=chat(url=url))
        assert r.status_code == 403, (url, r.text)


def test_paths_are_refused_without_allow_files(state):
    from cdcca.runtime.api import create_app

    with TestClient(create_app(state)) as c:
        r = c.post("/v1/chat/completions", json=chat(url="/etc/hostname"))
    assert r.status_code == 403 and "--allow-files" in r.json()["error"]["message"]


def test_requests_that_arrive_together_share_a_batch(state):
    from concurrent.futures import ThreadPoolExecutor

    from cdcca.runtime.api import create_app

    app = create_app(state, max_batch=8, max_wait_s=0.2)
    with TestClient(app) as c, ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: c.post("/v1/chat/completions", json=chat(url=png_data_url(i))).status_code, range(6)))
        batches = app.state.batcher.batches
    assert codes == [200] * 6
    assert batches < 6


def test_serve_a_requests_file(state, tmp_path):
    from PIL import Image

    from cdcca.cli.api import serve_requests

    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "what color is the shape?"},
            {"image": "a.png", "question": "is there a circle?", "answer": "yes"}]
    (tmp_path / "req.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = serve_requests(state, tmp_path / "req.jsonl", tmp_path / "answers.jsonl")
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert report["requests"] == 2 and len(answers) == 2 and all(a["answer"] in CANDIDATES for a in answers)
    assert report["mc"] in (0.0, 1.0)                     # scored on the one row that has an answer


def test_the_api_benchmark_reports_every_mode(state):
    from cdcca.bench.api import run_bench

    res = run_bench(state, n=4, concurrency=2, max_batch=4)
    assert [r["mode"].split(",")[0] for r in res["rows"]] == ["device answer", "HTTP", "HTTP"]
    assert all(r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in res["rows"])


def test_a_plain_string_message_without_an_image_is_400_not_422(client):
    body = {"messages": [{"role": "user", "content": "a long question without any picture " * 5}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "need_one_image"


def test_requests_served_a_batch_at_a_time_upload_the_rounds_share():
    """A round's budget (48 of 80) spread over requests as they come: about 60 % of them are uploaded,
    the most uncertain ones, whatever the batch size."""
    import numpy as np

    from cdcca.runtime.device import RequestBudget
    from cdcca.uplink import UTSConfig

    budget = RequestBudget(UTSConfig(selection="budget", budget=48), round_size=80)
    rng = np.random.default_rng(0)
    picked, seen = [], []
    for _ in range(100):
        batch = rng.uniform(0, 1, size=4).tolist()
        cfg = budget.uts_for(batch)
        assert cfg.selection == "threshold"
        picked += [u for u in batch if u > cfg.threshold]
        seen += batch
    assert 0.5 <= len(picked) / len(seen) <= 0.7
    assert np.mean(picked) > np.mean(seen)                 # the uncertain ones go
    keep_all = RequestBudget(UTSConfig(selection="threshold", threshold=0.3), round_size=80)
    assert keep_all.uts_for([0.1, 0.9]).threshold == 0.3    # a threshold device keeps its own rule
