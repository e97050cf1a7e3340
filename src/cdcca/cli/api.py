"""``cdcca device api`` and ``cdcca device serve --requests``: the device answering real requests."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cdcca.atomic import atomic_write
from cdcca.cli.common import console, fail, one_line_errors, open_device
from cdcca.data.jsonl import load_jsonl

STATE_HELP = "Device state dir (from `cdcca device init`)."


def device_api(
    state: Path = typer.Option(..., help=STATE_HELP),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; loopback unless you give another explicitly "
                                               "(terminate TLS in front of it, as for any local model server)."),
    port: int = typer.Option(8000, help="TCP port."),
    allow_files: Path | None = typer.Option(None, help="Folder whose image files a request may name by path "
                                                       "(default: data: URLs only)."),
    max_batch: int = typer.Option(16, help="Most requests answered in one model call."),
    max_wait_ms: float = typer.Option(10.0, help="How long the first request of a batch waits for company."),
):
    """Serve the device as an OpenAI-compatible API: POST /v1/chat/completions, GET /v1/models, GET /healthz."""
    import uvicorn

    from cdcca.runtime.api import create_app  # heavy: imported when the command runs, not for --help

    if not (state / "device.json").is_file():
        fail(f"no device state at {state}; create it with `cdcca device init --state {state} --device NAME`")
    if allow_files is not None and not allow_files.is_dir():
        fail(f"--allow-files {allow_files} is not a folder")
    if not 1 <= max_batch <= 256 or max_wait_ms < 0:
        fail("--max-batch must be 1..256 and --max-wait-ms ≥ 0")
    console.print(f"device API on http://{host}:{port}/v1 (state {state})")
    uvicorn.run(create_app(state, allow_files, max_batch, max_wait_ms / 1000), host=host, port=port, log_level="warning")


def serve_requests(state: Path, requests: Path, out: Path, batch: int = 32) -> dict:
    """Answer every row of a VQA JSONL file (``answer`` optional) through the device's serving path;
    one JSON line per request in ``out``, written atomically; accuracy where rows carry answers."""

    data = load_jsonl(requests, require_answer=False)
    device = open_device(state)
    results = []
    try:
        for s in range(0, len(data.questions), batch):
            rows = list(range(s, min(s + batch, len(data.questions))))
            results += device.serve(data.images[data.image_ids[rows]], [data.questions[i] for i in rows], "file")
    finally:
        device.close()
    lines = []
    for i, res in enumerate(results):
        lines.append(json.dumps({"question": data.questions[i], **res}))
    atomic_write(out, ("\n".join(lines) + "\n").encode())
    known = [i for i, a in enumerate(data.answers) if a is not None]
    return {"requests": len(results), "queued_for_upload": sum(r["queued_for_upload"] for r in results),
            "out": str(out), "mc": sum(results[i]["answer"] == data.answers[i] for i in known) / len(known) if known else None}


def device_serve(
    state: Path = typer.Option(..., help=STATE_HELP),
    round: int | None = typer.Option(None, help="Stream round to answer (the built-in request stream)."),
    requests: Path | None = typer.Option(None, help="Instead: a VQA JSONL file of requests (answer optional)."),
    out: Path | None = typer.Option(None, help="With --requests: where to write one JSON answer per line."),
):
    """Answer requests — one round of the built-in stream, or a JSONL file; uncertain samples go to the outbox (UTS)."""
    from cdcca.fleet.traffic import serve_round  # heavy: imported when the command runs, not for --help

    if (round is None) == (requests is None):
        fail("give either --round R (the built-in stream) or --requests FILE.jsonl --out answers.jsonl")
    with one_line_errors():
        if requests is not None:
            if out is None:
                fail("--requests needs --out FILE.jsonl for the answers")
            print(json.dumps(serve_requests(state, requests, out)))
            return
        device = open_device(state)
        try:
            print(json.dumps(serve_round(device, round)))
        finally:
            device.close()
