"""``cdcca bench cost``: one cost table, measured in one run.

The device: answer latency per request (one image at a time) and per batch, through the path the API
takes (``DeviceRuntime.serve``: image → tokens → answer → UTS → outbox); its peak RSS, measured before
the cloud's models load; its parameters against the cloud's. The cloud: seconds per round against the
uploads of one device (64 … 512) and against the devices of a round (1, 8, 32; one student each, or one
fleet group sharing one student), with a linear fit (seconds per upload and the constant); the bytes of
each round up and down. Devices share one model object (every device serves round 0 from version 0).
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cdcca.config import RunConfig
from cdcca.fleet.traffic import SimulatedTraffic
from cdcca.metrics import latency_ms
from cdcca.model.mllm import is_adapter_key
from cdcca.runtime import protocol
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime
from cdcca.trained_pair import active


def _rss_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _params(model) -> dict[str, int]:

    named = list(model.named_parameters())
    return {"total": sum(p.numel() for _, p in named), "adapters": sum(p.numel() for n, p in named if is_adapter_key(n))}


def _images(n: int) -> np.ndarray:

    images = active().task.split("test").images
    return images[np.arange(n) % len(images)]


def device_costs(root: Path, tiny: bool, requests: int, batch: int) -> tuple[dict, object]:
    """Answer latency per request and per batch on a fresh device; its RSS and parameters; its model."""
    import torch

    dev = DeviceRuntime.create(root / "latency", "latency", tiny=tiny)
    images = _images(max(requests, batch))
    question = active().task.split("test").questions[0]          # one of the served pair's own questions
    with torch.no_grad():
        dev.serve(images[:1], [question])                         # warm-up: the encoder loads on first use
        one = []
        for i in range(requests):
            t0 = time.perf_counter()
            dev.serve(images[i:i + 1], [question])
            one.append(time.perf_counter() - t0)
        many = []
        for _ in range(max(3, requests // batch)):
            t0 = time.perf_counter()
            dev.serve(images[:batch], [question] * batch)
            many.append(time.perf_counter() - t0)
    model = dev.model
    dev.close()
    out = {"per_request": latency_ms(one, 2), "per_batch": {"batch": batch, **latency_ms(many, 2),
                                                           "per_request_ms": round(float(np.median(many)) * 1000 / batch, 2)},
           "peak_rss_mib": _rss_mib(), "params": _params(model)}
    return out, model


MAX_SERVED_ROUNDS = 16          # the persistent stream's length: enough for 16 × 80 = 1,280 uploads


def cloud_round(root: Path, models, cfg: RunConfig, devices: int, per_device: int, group: str | None, device_model) -> dict:
    """One round: ``devices`` devices upload ``per_device`` samples each (the run's UTS, that budget); the
    cloud's seconds and bytes (the run's DWC)."""
    tiny = cfg.model.tiny
    cloud = CloudRuntime(root / "cloud", models[0], models[1], cfg.dwc)
    uts = replace(cfg.uts, selection="budget", budget=per_device)
    devs = [DeviceRuntime.create(root / f"dev-{i}", f"dev-{i}", tiny=tiny, uts=uts, model=device_model,
                                 stream={"index": i, "n_devices": devices, "per_round": per_device})
            for i in range(devices)]
    try:
        for dev in devs:
            cloud.set_group(dev.device_id, group)
            traffic = SimulatedTraffic.of(dev)
            for rnd in range(MAX_SERVED_ROUNDS):          # a round of the stream has 80 requests: serve rounds
                traffic.serve(dev, rnd)                   # until the outbox holds this row's uploads
                if dev.outbox.size() >= per_device:
                    break
        ups = {dev.device_id: protocol.device_uplink(dev, 0, max_samples=per_device) for dev in devs}
        timing: dict[str, float] = {}
        downs = protocol.cloud_round(cloud, ups, timing=timing)     # every upload committed, then each round
        seconds = sum(timing.values())
    finally:
        for dev in devs:
            dev.close()
        cloud.close()
    up = sum(len(u.packet) for u in ups.values() if u.packet is not None)
    down = sum(len(p) for d in downs.values() for p in d.packets)
    uploads = sum(len(d.acked) for d in downs.values())
    return {"devices": devices, "group": group, "uploads": uploads, "cloud_s": round(seconds, 3),
            "bytes_up": up, "bytes_down": down}


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """``y ≈ slope·x + constant`` by least squares, and R² (how linear it is)."""
    slope, const = np.polyfit(x, y, 1)
    pred = slope * np.array(x) + const
    ss = float(np.sum((np.array(y) - np.mean(y)) ** 2))
    r2 = 1.0 - float(np.sum((np.array(y) - pred) ** 2)) / ss if ss > 0 else 1.0
    return {"slope": round(float(slope), 5), "constant": round(float(const), 3), "r2": round(r2, 4)}


def run_cost(cfg: RunConfig, uploads=(64, 128, 256, 512), devices=(1, 8, 32), per_device: int = 16,
             requests: int = 64, batch: int = 16, log=None) -> dict:
    """The whole table (see the module docstring) for the run config's models (``model.tiny``: random tiny
    ones, the keys and not the numbers), AKD, DWC and UTS, the cloud on ``torch_device``."""
    tiny, torch_device = cfg.model.tiny, cfg.torch_device

    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdcca-cost-") as tmp:
        root = Path(tmp)
        log("device: answer latency and memory …")
        device, device_model = device_costs(root, tiny, requests, batch)
        first = CloudRuntime.open(root / "models", tiny=tiny, akd=cfg.akd, torch_device=torch_device)   # loaded once
        models = (first.akd, first.initial_state)
        by_uploads = []
        for n in uploads:
            log(f"cloud: one device, {n} uploads …")
            by_uploads.append(cloud_round(root / f"u{n}", models, cfg, 1, n, None, device_model))
        by_devices = []
        for d in devices:
            for group in (None, "all"):
                log(f"cloud: {d} devices × {per_device} uploads, {'one group' if group else 'a student each'} …")
                by_devices.append(cloud_round(root / f"d{d}-{group}", models, cfg, d, per_device, group, device_model))
        first.close()
    cloud = {"params": _params(models[0].teacher), "torch_device": torch_device, "peak_rss_mib": _rss_mib(),
             "by_uploads": by_uploads, "by_devices": by_devices,
             "fit_uploads": linear_fit([r["uploads"] for r in by_uploads], [r["cloud_s"] for r in by_uploads])}
    for group in (None, "all"):
        rows = [r for r in by_devices if r["group"] == group]
        cloud[f"fit_devices_{'group' if group else 'each'}"] = linear_fit([r["devices"] for r in rows], [r["cloud_s"] for r in rows])
    return {"tiny": tiny, "device": device, "cloud": cloud,
            "param_ratio_cloud_to_device": round(cloud["params"]["total"] / device["params"]["total"], 2),
            "wall_s": round(time.perf_counter() - t_start, 1),
            "notes": ["device peak RSS: the process before any cloud model loaded (encoder, device model, data); "
                      "cloud peak RSS: the whole process after the cloud rounds (device included)",
                      "cloud_s: run_round of every device of the round (teacher pass, AKD, DWC), uploads already received"]}
