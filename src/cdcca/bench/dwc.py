"""``cdcca bench dwc``: downlink bytes against accuracy on real AKD deltas.

A dense AKD run over the default stream records the device's adapter state after every round
(cached). Each DWC setting then replays that trajectory through the compressor: the device starts
from the pretrained adapters and, round after round, receives only the compressed update towards
the next AKD state (with or without error feedback). We report downlink bytes, their ratio to the
dense fp16 delta and to the full device model, and the device's final held-out accuracy against
applying the dense fp32 updates. (The AKD targets are those of the dense run: in the live system the
student starts from the compressed mirror instead, which the demo measures.)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from cdcca.bench.loop import heldout_mc
from cdcca.data.stream import resolve_sequence
from cdcca.downlink import DWCConfig, apply_delta, build_update, decode_update
from cdcca.model.encoder import load_encoder
from cdcca.model.mllm import adapter_state, load_adapter_state
from cdcca.model.pair import load_pretrained, model_prompter
from cdcca.trained_pair import active
from cdcca.wire import decode

DEFAULT = DWCConfig()


def settings() -> dict[str, DWCConfig]:
    out = {}
    for budget in (32, 128, 256, 512, 1024, 2048):
        for q in ("int8", "int4", "nf4"):
            out[f"{q}:{budget}K"] = replace(DEFAULT, budget_bytes=budget * 1024, quantizer=q)
        out[f"int8:{budget}K:no-ef"] = replace(DEFAULT, budget_bytes=budget * 1024, error_feedback=False)
    return out


def trajectory(states_dir: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted(states_dir.glob("round*.safetensors"), key=lambda p: int(p.stem[5:]))
    if len(files) < 3:
        raise FileNotFoundError(f"need ≥ 3 rounds of AKD states in {states_dir}; run `cdcca bench akd --save-states {states_dir}`")
    return [load_file(str(f)) for f in files]


def replay(base: dict, targets: list[dict], cfg: DWCConfig) -> tuple[dict, list[int], float]:
    """Send the trajectory through DWC; returns the device's final state, bytes per round, encode+decode s."""
    state, residual, sizes, secs = base, None, [], 0.0
    for r, target in enumerate(targets):
        t0 = time.perf_counter()
        packet, _mirror, residual, _ = build_update(state, target, residual, cfg, device_id="bench",
                                                   base_version=r, new_version=r + 1, round=r)
        state = apply_delta(state, decode_update(decode(packet, expect_kind="update")))
        secs += time.perf_counter() - t0
        sizes.append(len(packet))
    return state, sizes, secs


def throughput(base: dict, target: dict, cfg: DWCConfig, repeats: int = 5) -> dict:
    """Median encode and decode time of one real delta, as MB/s of fp32 delta (one thread)."""
    torch.set_num_threads(1)
    mb = sum(v.numel() for v in base.values()) * 4 / 1e6
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        packet, *_ = build_update(base, target, None, cfg, device_id="bench", base_version=0, new_version=1)
        t1 = time.perf_counter()
        decode_update(decode(packet, expect_kind="update"))
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    e, d = statistics.median(enc), statistics.median(dec)
    return {"delta_mb_fp32": round(mb, 2), "encode_s": round(e, 4), "decode_s": round(d, 4),
            "encode_decode_mb_s": round(mb / (e + d), 1)}


def device_model_bytes(model) -> int:
    """fp16 size of everything the device holds: LLM, bridge, adapters and the vision encoder."""

    n = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in load_encoder().parameters())
    return 2 * n


def run(states_dir: Path, heldout_n: int = 200, names: list[str] | None = None, on_result=None,
        torch_device: str = "cpu") -> dict:

    table = settings()
    unknown = [n for n in names or [] if n not in table]
    if unknown:            # before any model is loaded
        raise KeyError(f"unknown DWC setting(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    targets = trajectory(states_dir)
    data = active().task.split("test")
    device = load_pretrained("device")
    prompter = model_prompter(device, active().answers)
    base = adapter_state(device)
    device.to(torch_device)           # evaluation only: states are loaded into it, tokens follow it (model/answer.py)
    domains = resolve_sequence("default")

    def accuracy(state) -> float:
        load_adapter_state(device, state)
        return float(np.mean(list(heldout_mc(device, prompter, data, domains, heldout_n).values())))

    dense_fp16 = sum(v.numel() for v in base.values()) * 2
    model_bytes = device_model_bytes(device)
    dense_acc = accuracy(targets[-1])
    rows = [{"setting": "dense-fp32", "bytes_per_round": sum(v.numel() for v in base.values()) * 4,
             "ratio_dense_fp16": 2.0, "heldout_mc": dense_acc, "delta_vs_dense": 0.0}]
    for name in names or list(table):
        state, sizes, _ = replay(base, targets, table[name])
        acc = accuracy(state)
        per_round = float(np.mean(sizes))
        rows.append({"setting": name, "bytes_per_round": round(per_round), "ratio_dense_fp16": per_round / dense_fp16,
                     "ratio_device_model": per_round / model_bytes, "heldout_mc": acc, "delta_vs_dense": acc - dense_acc})
        if on_result:
            on_result(rows[-1])
    return {"rounds": len(targets), "dense_fp16_bytes": dense_fp16, "device_model_fp16_bytes": model_bytes,
            "default": f"{DEFAULT.quantizer}:{DEFAULT.budget_bytes // 1024}K", "results": rows, "throughput": throughput(base, targets[0], DEFAULT)}
