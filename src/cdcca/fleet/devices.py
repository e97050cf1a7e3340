"""The devices of a local fleet: their state dirs and their APIs, beside the SuperNodes that serve them.

A deployed device is its state dir, served by two processes: ``cdcca device api`` answers requests and
fills the outbox; the SuperNode's ClientApp packs that outbox and applies updates into the adapter
store, which the API follows between two batches (docs/DEPLOY.md).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cdcca.fleet.processes import Pids, ProcessError, device_env, flower_env, free_port, spawn, wait_http


def cdcca_bin() -> str:
    path = Path(sys.executable).parent / "cdcca"
    if not path.exists():
        raise ProcessError(f"cdcca not found next to {sys.executable}; install it there: pip install -e .")
    return str(path)


def init_devices(dirs: dict[str, Path], tiny: bool, timeout: float) -> None:
    """Create each device's state (name → state dir; the shipped adapters as version 0) where none exists
    yet, before anything serves it; all at once, each in its own process. Device i of n gets slice i of
    the request stream."""
    n, procs = len(dirs), {}
    for i, (name, d) in enumerate(dirs.items()):
        if not (d / "device.json").is_file():
            cmd = [cdcca_bin(), "device", "init", "--state", str(d), "--device", name, "--index", str(i),
                   "--n-devices", str(n), *(["--tiny"] if tiny else [])]
            procs[name] = subprocess.Popen(cmd, env=device_env(flower_env(), n), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise ProcessError(f"creating {name}'s state failed: {' '.join(out.split())[-300:]}")


def start_apis(state: Path, dirs: dict[str, Path], pids: Pids, first_port: int, timeout: float,
               log: Callable[[str], None]) -> dict[str, int]:
    """``cdcca device api`` on each state dir of ``dirs`` (name → dir; a SuperNode's data-dir), on
    127.0.0.1:``first_port`` + i (0: free ports), logs in ``state/logs``; waits until each answers /healthz."""
    ports, procs = {}, {}
    for i, (name, d) in enumerate(dirs.items()):
        ports[name] = first_port + i if first_port else free_port()
        cmd = [cdcca_bin(), "device", "api", "--state", str(d), "--port", str(ports[name])]
        procs[name] = spawn(f"api-{name}", cmd, device_env(flower_env(), len(dirs)),
                            state / "logs" / f"api-{name}.log", pids)
    for name, proc in procs.items():
        wait_http(f"http://127.0.0.1:{ports[name]}/healthz", proc, state / "logs" / f"api-{name}.log",
                  max(timeout, 180), f"{name}'s API")
    log("device APIs: " + ", ".join(f"{n} http://127.0.0.1:{p}/v1" for n, p in ports.items()))
    return ports


