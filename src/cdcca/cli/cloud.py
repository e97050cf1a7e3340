"""``cdcca cloud``: the cloud runtime on a state dir — receive uplinks, run rounds, resync, fleet groups."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import typer

from cdcca.cli.common import TorchDeviceOpt, fail, one_line_errors, torch_device_or_fail
from cdcca.runtime.cloud_db import commit_uplink, group_registry, open_db, remembered_tiny
from cdcca.wire import write_packet

cloud_app = typer.Typer(no_args_is_help=True, help="Cloud runtime: inbox, per-device mirrors, AKD → DWC rounds, fleet groups.")
STATE_HELP = "State directory of the cloud runtime."


def _cloud(state: Path, tiny: bool | None, torch_device: str = "cpu"):
    from cdcca.runtime.cloud import CloudRuntime  # heavy: imported when the command runs, not for --help

    return CloudRuntime.open(state, tiny=tiny, torch_device=torch_device)


def _receive(state: Path, tiny: bool | None, uplink: bytes) -> list[str]:
    """An existing state takes the torch-free inbox write (no torch import: ~1.5 s saved per packet);
    only creating a state goes through the runtime. Both commit with ``commit_uplink``."""

    if not (state / "cloud.json").is_file():
        return _cloud(state, tiny).receive(uplink)
    remembered_tiny(state, tiny)          # refuses --tiny/--no-tiny against what the state was created with
    with closing(open_db(state)) as db:
        return commit_uplink(db, state, uplink).sample_ids


@cloud_app.command("receive")
def cloud_receive(packet: Path, state: Path = typer.Option(..., help=STATE_HELP), tiny: bool | None = typer.Option(None, help="Tiny models (chosen when the state is created, remembered after)."),
                  ack_out: Path | None = typer.Option(None, help="Write the acknowledged sample ids here (JSON).")):
    """Commit an uplink packet to the inbox and print the acknowledged sample ids."""
    with one_line_errors():
        ids = _receive(state, tiny, packet.read_bytes())
    if ack_out:
        ack_out.write_text(json.dumps(ids))
    print(json.dumps({"acknowledged": len(ids)}))


@cloud_app.command("round")
def cloud_round(state: Path = typer.Option(..., help=STATE_HELP), device_id: str = typer.Option(..., "--device", help="Device name."),
                out: Path = typer.Option(..., help="Where to write the update packet."), tiny: bool | None = typer.Option(None, help="Tiny models (chosen when the state is created, remembered after)."),
                torch_device: TorchDeviceOpt = None):
    """AKD → DWC for one device's new uploads; the update packet is stored before it is written to --out."""

    torch_device = torch_device_or_fail(torch_device)
    with one_line_errors():
        cloud = _cloud(state, tiny, torch_device)
        packet = cloud.run_round(device_id)
    if packet is None:
        fail(f"no new uploads from {device_id}: nothing to distil")
    write_packet(out, packet)
    print(json.dumps({"update": str(out), "bytes": len(packet), "metrics": cloud.metrics(device_id)[-1]}))


@cloud_app.command("resync")
def cloud_resync(state: Path = typer.Option(..., help=STATE_HELP), device_id: str = typer.Option(..., "--device", help="Device name."),
                 out: Path = typer.Option(..., help="Where to write the dense resync packet."), tiny: bool | None = typer.Option(None, help="Tiny models (chosen when the state is created, remembered after).")):
    """A full dense adapter state for a device that fell out of sync."""

    with one_line_errors():
        packet = _cloud(state, tiny).resync(device_id)
    write_packet(out, packet)
    print(json.dumps({"resync": str(out), "bytes": len(packet)}))


@cloud_app.command("group")
def cloud_group(state: Path = typer.Option(..., help=STATE_HELP),
                device_id: str | None = typer.Option(None, "--device", help="Device to assign (omit to list the assignments)."),
                group: str | None = typer.Option(None, help="Fleet group the device joins: its rounds then train the group's shared student."),
                leave: bool = typer.Option(False, "--leave", help="Take the device out of its group (back to its own student).")):
    """Assign devices to fleet groups (same site, same camera): the cloud pools a group's uploads into one student.
    Needs no model: it edits the cloud's registry only."""

    if device_id is not None and (group is None) == (not leave):
        fail("give exactly one of --group NAME or --leave with --device")
    with one_line_errors():
        registry = group_registry(state)
        if device_id is not None:
            registry.set(device_id, None if leave else group)
        print(json.dumps(registry.assignments()))
