"""Processes a local fleet starts: one process group each, recorded in ``pids.json``, stopped by group.

A pid is recorded with the kernel's start time of its process, so a recycled pid is never signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cdcca

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",                       # no usage pings
    "FLWR_DISABLE_UPDATE_CHECK": "1",                    # no version check on start
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", # else the SuperLink runs `uv sync` every run
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",         # start app processes sooner (default 1 s);
                                                         # 0.05 costs ~5 % of a core per idle process
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class ProcessError(RuntimeError):
    """A process the fleet started exited or did not come up; the message names its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"



def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against killing a recycled pid); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_ = stat[stat.rindex(")") + 2:].split()
    return None if fields_[0] == "Z" else fields_[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)          # reap it if it is our exited child
    except ChildProcessError:
        pass
    now = start_time(pid)
    if now is None:
        return False
    return start is None or now == start


class Pids:
    def __init__(self, state: Path):
        self.path = state / "pids.json"

    def read(self) -> dict[str, dict]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def add(self, name: str, proc: subprocess.Popen) -> None:
        pids = self.read()
        pids[name] = {"pid": proc.pid, "start": start_time(proc.pid), "cmd": proc.args[0]}
        self.path.write_text(json.dumps(pids, indent=2) + "\n")

    def ours(self) -> dict[str, int]:
        """Recorded pids whose process is still the one started (a recycled pid is someone else's)."""
        return {n: i["pid"] for n, i in self.read().items() if start_time(i["pid"]) in (None, i.get("start"))}

    def alive(self) -> dict[str, dict]:
        return {n: p for n, p in self.read().items() if _alive(p["pid"], p.get("start"))}


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment of every Flower process: quiet, no runtime installs, and this cdcca importable."""
    env = {**os.environ, **FLOWER_ENV}
    bin_dir = str(Path(sys.executable).parent)           # flwr-serverapp / flwr-clientapp of this venv
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    src = str(Path(cdcca.__file__).resolve().parents[1])  # so app processes import this very cdcca
    env["PYTHONPATH"] = os.pathsep.join(p for p in [src, env.get("PYTHONPATH", "")] if p)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ProcessError(f"{name} not found next to {sys.executable}; install Flower there: pip install flwr==1.42.0")
    return str(path)


def supernode_cmd() -> list[str]:
    """How the fleet starts a SuperNode: Flower's own, through :mod:`cdcca.fleet.supernode` (a shorter wait
    after an empty pull)."""
    flower_bin("flower-supernode")           # the same check that Flower is installed here
    return [sys.executable, "-m", "cdcca.fleet.supernode"]


def device_env(env: dict[str, str], devices: int) -> dict[str, str]:
    """N devices share this machine's cores: each device's processes get its share of threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(max(1, (os.cpu_count() or 1) // devices)))
    return env


def spawn(name: str, cmd: list[str], env: dict[str, str], log_path: Path, pids: Pids) -> subprocess.Popen:
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)     # own process group: `down` stops its children too
    pids.add(name, proc)
    return proc


def wait_listening(address: tuple[str, int], proc: subprocess.Popen, log_path: Path, timeout: float,
                   what: str = "the SuperLink") -> None:
    """Wait until ``address`` accepts a TCP connection, or fail naming ``what`` and its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessError(f"{what} exited with code {proc.returncode}: {tail(log_path)}")
        try:
            with socket.create_connection(address, timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise ProcessError(f"{what} did not listen on {address[0]}:{address[1]} within {timeout:.0f} s; "
                      f"see {log_path}")


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float, what: str) -> None:
    """Wait until ``url`` answers 200 (a server that also loads a model before it listens), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessError(f"{what} exited with code {proc.returncode}: {tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise ProcessError(f"{what} did not answer {url} within {timeout:.0f} s; see {log_path}")


def pids_with_args(*needles: str) -> list[int]:
    """Processes whose command line holds every one of ``needles`` (processes a server started on its own)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(n in args for n in needles):
                found.append(int(proc.name))
    return found


def stop_groups(groups: dict[str, int], timeout: float, group: bool = True) -> list[str]:
    """SIGTERM every process group (``group=False``: every process), SIGKILL what is left after ``timeout``
    s; returns the names signalled."""
    stopped = [n for n, pid in groups.items() if signal_group(pid, signal.SIGTERM, group)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(signal_group(pid, 0, group) for pid in groups.values()):
        time.sleep(0.1)
    for pid in groups.values():
        signal_group(pid, signal.SIGKILL, group)
    return stopped


def signal_group(pgid: int, sig: int, group: bool = True) -> bool:
    """Send ``sig`` to process group ``pgid`` (or to that one process; 0: only test it exists); False when gone."""
    try:
        os.waitpid(pgid, os.WNOHANG)         # reap the leader if it is our exited child
    except ChildProcessError:
        pass
    try:
        (os.killpg if group else os.kill)(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
