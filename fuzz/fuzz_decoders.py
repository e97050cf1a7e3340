"""Coverage-guided fuzzing (atheris / libFuzzer) of every decoder that reads data from outside.

    make fuzz                                   # every target, 100,000 inputs each; runs/fuzz/report.json
    python fuzz/fuzz_decoders.py --all --runs 100000 [--out runs/fuzz]
    python fuzz/fuzz_decoders.py packet -runs=1000 CORPUS_DIR     # one target, libFuzzer flags

Targets and what counts as a clean rejection (anything else is a crash and stops the run):
- ``packet``: ``wire.decode`` of the bytes, then the uplink / update / resync decoder of whatever
  parsed — :class:`cdcca.wire.PacketError`;
- ``jsonl``: one row of a VQA JSONL file — :class:`cdcca.data.jsonl.RowError`;
- ``device-state``: a device state dir whose ``device.json`` and adapter-store ``CURRENT`` are the bytes —
  ``ValueError`` / ``FileNotFoundError`` / ``StoreError``, each with a one-line message.
Seeds are real packets and files built on the fly. Hangs (``-timeout``) and memory (``-rss_limit_mb``)
are libFuzzer's own limits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ("packet", "jsonl", "device-state")


def _seeds(target: str) -> list[bytes]:
    """Valid inputs for a target, for the fuzzer to mutate."""
    import torch

    if target == "jsonl":
        return [json.dumps({"image": "a.png", "question": "what color is it?", "answer": "red",
                            "candidates": ["red", "blue"]}).encode(), b'{"image": "b.png", "question": "q"}']
    from cdcca.downlink import DWCConfig, build_resync, build_update
    from cdcca.model.answer import Answer
    from cdcca.uplink import UTSConfig, build_uplink, plan_uplink

    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(16, generator=g)}
    if target == "device-state":
        cfg = {"device_id": "d", "tiny": True, "uts": {}, "stream": {"tiny": True}, "bytes_up": 0, "bytes_down": 0}
        return [json.dumps(cfg).encode() + b"\x00" + json.dumps({"version": 0, "hash": "0" * 64}).encode()]
    target_state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    update = build_update(state, target_state, None, DWCConfig(budget_bytes=4096), device_id="d", base_version=0,
                          new_version=1)[0]
    uts = UTSConfig(selection="budget", budget=2, token_scorer="energy")
    tokens = torch.randn(2, 49, 32, generator=g)
    answers = [Answer("red", "red", 0.5, [0.7], 0.1, [0.5, 0.5])] * 2
    uplink = build_uplink(plan_uplink(tokens, ["q1", "q2"], answers, ["s1", "s2"], uts), uts, device_id="d",
                          adapter_version="0")
    return [update, uplink, build_resync(state, device_id="d", version=3)]


def _packet(data: bytes) -> None:
    from cdcca.downlink import decode_resync, decode_update
    from cdcca.uplink import decode_uplink
    from cdcca.wire import PacketError, decode

    try:
        packet = decode(data)
        if packet.kind == "uplink":
            decode_uplink(data, fill="zeros")
        elif packet.kind == "update":
            decode_update(packet)
        elif packet.kind == "resync":
            decode_resync(packet)
    except PacketError:
        pass


def _jsonl(data: bytes) -> None:
    from cdcca.data.jsonl import RowError, parse_row

    try:
        parse_row(Path("fuzz.jsonl"), 1, data.decode("utf-8", errors="replace"))
    except RowError:
        pass


def _device_state(data: bytes) -> None:
    from cdcca.runtime.adapter_store import StoreError
    from cdcca.runtime.device import DeviceRuntime

    config, _, current = data.partition(b"\x00")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "adapters").mkdir()
        (d / "device.json").write_bytes(config)
        (d / "adapters" / "CURRENT").write_bytes(current)
        (d / "adapters" / "store.json").write_text(json.dumps({"format": 1, "device_id": "d", "keep": 5}))
        try:
            DeviceRuntime.open(d).close()
        except (ValueError, FileNotFoundError, StoreError) as exc:
            assert str(exc) and "\n" not in str(exc).strip(), f"not a one-line message: {exc!r}"


def fuzz_one(target: str, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["cdcca"]):
        import cdcca.data.jsonl
        import cdcca.downlink
        import cdcca.runtime.device
        import cdcca.uplink
        import cdcca.wire  # noqa: F401
    corpus = next((a for a in argv if not a.startswith("-")), None)
    if corpus:
        Path(corpus).mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(_seeds(target)):
            (Path(corpus) / f"seed-{i}").write_bytes(seed)
    fn = {"packet": _packet, "jsonl": _jsonl, "device-state": _device_state}[target]
    atheris.Setup([sys.argv[0], *argv], fn)
    atheris.Fuzz()


def run_all(runs: int, out: Path) -> dict:
    """Every target as its own libFuzzer process (it exits when done); inputs, crashes, peak memory."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"runs_per_target": runs, "targets": {}}
    for target in TARGETS:
        log = out / f"{target}.log"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, target, f"-runs={runs}", "-timeout=10", "-rss_limit_mb=4096",
                               "-print_final_stats=1", f"-artifact_prefix={out}/{target}-", str(out / f"corpus-{target}")],
                              capture_output=True, text=True)
        log.write_text(proc.stdout + proc.stderr)
        stats = {k.strip(): v.strip() for k, _, v in (line.partition(": ") for line in proc.stderr.splitlines()
                                                         if line.startswith("stat::"))}
        report["targets"][target] = {
            "exit_code": proc.returncode, "inputs": int(stats.get("stat::number_of_executed_units", 0)),
            "peak_rss_mb": int(stats.get("stat::peak_rss_mb", 0)), "seconds": round(time.perf_counter() - t0, 1),
            "crashes": sorted(p.name for p in out.glob(f"{target}-crash-*")),
            "hangs": sorted(p.name for p in out.glob(f"{target}-timeout-*"))}
        print(target, report["targets"][target], flush=True)
    report["total_inputs"] = sum(t["inputs"] for t in report["targets"].values())
    report["ok"] = all(t["exit_code"] == 0 and not t["crashes"] and not t["hangs"] for t in report["targets"].values())
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--all":
        import argparse

        ap = argparse.ArgumentParser()
        ap.add_argument("--all", action="store_true")
        ap.add_argument("--runs", type=int, default=100_000)
        ap.add_argument("--out", type=Path, default=Path("runs/fuzz"))
        a = ap.parse_args()
        sys.exit(0 if run_all(a.runs, a.out)["ok"] else 1)
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} --all [--runs N] | {{{','.join(TARGETS)}}} [libFuzzer flags] [CORPUS]")
    fuzz_one(sys.argv[1], sys.argv[2:])
