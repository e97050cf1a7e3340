"""``cdcca bench api``: requests per second and latency of the device's chat-completions endpoint.

A real server (uvicorn on 127.0.0.1, the real device and encoder) is started in this process's
background thread; clients send easy-VQA test images as PNG data URLs. Three measurements, same
requests, same process: the device's own answer time for one request (encode + answer + UTS, no
HTTP: the baseline), requests one at a time over HTTP, and ``concurrency`` clients at once (the
server batches what arrives together). Latencies are per request; p50/p99 over all requests.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cdcca.fleet.deploy import free_port
from cdcca.metrics import latency_ms
from cdcca.runtime.api import DeviceService, Query, create_app
from cdcca.trained_pair import active


def _data_url(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _percentiles(lat: list[float]) -> dict:
    return {**latency_ms(lat), "mean_ms": round(float(np.mean(lat)) * 1000, 1)}


def _serve(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def run_bench(state: Path, n: int = 64, concurrency: int = 8, max_batch: int = 16) -> dict:
    import httpx

    data = active().task.split("test")
    qids = np.arange(n) * 7 % len(data.questions)
    bodies = [{"model": "cdcca-device", "messages": [{"role": "user", "content": [
        {"type": "text", "text": data.questions[q]},
        {"type": "image_url", "image_url": {"url": _data_url(data.images[data.image_ids[q]])}}]}]} for q in qids]

    service = DeviceService(state)                    # the baseline: the device's own answer path, no HTTP
    try:
        service.answer([Query(data.images[data.image_ids[qids[0]]], data.questions[qids[0]])])   # warm-up
        own = []
        for q in qids:
            t0 = time.perf_counter()
            service.answer([Query(data.images[data.image_ids[q]], data.questions[q])])
            own.append(time.perf_counter() - t0)
    finally:
        service.close()

    port = free_port()
    app = create_app(state, max_batch=max_batch)
    server, thread = _serve(app, port)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        with httpx.Client(timeout=120) as client:
            client.post(url, json=bodies[0]).raise_for_status()          # warm-up

            def one(body) -> float:
                t0 = time.perf_counter()
                client.post(url, json=body).raise_for_status()
                return time.perf_counter() - t0

            t0 = time.perf_counter()
            serial = [one(b) for b in bodies]
            serial_s = time.perf_counter() - t0
            batches_before = app.state.batcher.batches
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                together = list(pool.map(one, bodies))
            together_s = time.perf_counter() - t0
            batches = app.state.batcher.batches - batches_before
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    rows = [{"mode": "device answer, no HTTP (baseline)", "requests_per_s": round(n / sum(own), 2), **_percentiles(own)},
            {"mode": "HTTP, one at a time", "requests_per_s": round(n / serial_s, 2), **_percentiles(serial)},
            {"mode": f"HTTP, {concurrency} concurrent clients (batched)", "requests_per_s": round(n / together_s, 2),
             "mean_batch": round(n / max(batches, 1), 2), **_percentiles(together)}]
    return {"n": n, "concurrency": concurrency, "max_batch": max_batch, "rows": rows,
            "speedup_batched_vs_serial": round(serial_s / together_s, 2),
            "http_overhead_ms_p50": round(rows[1]["p50_ms"] - rows[0]["p50_ms"], 1)}
