"""``cdcca device export``: a device's current adapters in other tools' formats (peft's, for now)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cdcca.cli.common import fail, open_device


def device_export(state: Path = typer.Option(..., help="State directory of the device runtime."),
                  peft: Path = typer.Option(..., "--peft", help="Folder for adapter_model.safetensors + adapter_config.json "
                                            "(peft's layout) and cdcca_bridge.safetensors (the bridge and norms peft's files lack).")):
    """Export the device's current adapters so that peft.PeftModel.from_pretrained loads them onto the device's LLM."""
    from cdcca.model.export import export_peft  # here: it imports torch (`cdcca --help` stays fast)

    device = open_device(state)
    try:
        report = export_peft(device.model, peft, device_id=device.device_id, version=device.store.version)
    except OSError as exc:
        fail(f"cannot write {peft}: {exc.strerror or exc}")
    print(json.dumps(report))
