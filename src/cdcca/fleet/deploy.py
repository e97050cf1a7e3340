"""A Flower fleet on one machine: one SuperLink (the cloud) and N SuperNodes (the devices), as processes.

    cdcca fleet up --devices 2 --state runs/fleet      # certificates, SuperLink, node keys, SuperNodes
    cdcca fleet run --state runs/fleet --rounds 3      # flwr run <cdcca/fleet/app> fleet --stream
    cdcca fleet down --state runs/fleet                # stop what `up` started, by process group

The state dir holds everything (keys and certificates 0600 in 0700 folders):

    fleet.json       what `up` started: host, port, TLS, devices and their node ids (read by run/down)
    pids.json        one process group per SuperLink / SuperNode
    tls/             ca.pem ca.key server.pem server.key      (absent with --insecure)
    keys/            dev-1 dev-1.pub ...  OpenSSH ECDSA P-384 node keys
    superlink.db     SuperLink state: runs and registered nodes survive a restart
    flwr-home/       FLWR_HOME of the SuperLink and the flwr CLI (config.toml names connection "fleet")
    cloud/           cloud runtime state, fleet-rounds.jsonl (one line per round)
    devices/dev-i/   device runtime state (the SuperNode's data-dir)
    nodes/dev-i/     FLWR_HOME of SuperNode dev-i
    logs/            superlink.log, dev-i.log, run-<time>.log

TLS and SuperNode authentication are on unless ``insecure=True``, which is refused for a host other
than loopback. A two-machine deployment runs the same commands by hand: see docs/DEPLOY.md.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cdcca.config import RunConfig, apply, flat_toml
from cdcca.fleet import certs
from cdcca.fleet.devices import init_devices, start_apis
from cdcca.fleet.flower import READY_FILE, ROUND_LOG, STOP_FILE
from cdcca.fleet.processes import (
    Pids,
    ProcessError,
    device_env,
    flower_bin,
    flower_env,
    free_port,
    pids_with_args,
    spawn,
    stop_groups,
    supernode_cmd,
    tail,
    wait_listening,
)

APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "fleet"              # the flwr CLI's name for this SuperLink in flwr-home/config.toml
DEFAULT_PORT = 9092


DeployError = ProcessError   # a fleet cannot be started, run or stopped; the message names the cause and the fix


@dataclass
class FleetSpec:
    """What ``up`` started; saved as ``fleet.json`` in the state dir."""

    state: str
    devices: list[str]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    insecure: bool = False
    tiny: bool = False
    node_ids: dict[str, int] = field(default_factory=dict)
    apis: dict[str, int] = field(default_factory=dict)     # device name → its API's port on 127.0.0.1

    @property
    def address(self) -> str:
        """Where local clients dial the SuperLink (a wildcard bind is dialled on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def save(self) -> None:
        (Path(self.state) / "fleet.json").write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, state: str | os.PathLike[str]) -> FleetSpec:
        path = Path(state) / "fleet.json"
        if not path.is_file():
            raise DeployError(f"no fleet in {state} (no fleet.json); start one with `cdcca fleet up --state {state}`")
        return cls(**json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------------
# environment and small helpers

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _toml_str(s: str) -> str:
    return json.dumps(str(s))                 # a JSON string is a valid TOML basic string


def _flwr(args: list[str], spec: FleetSpec, timeout: float = 60) -> subprocess.CompletedProcess:
    home = Path(spec.state) / "flwr-home"
    return subprocess.run([flower_bin("flwr"), *args], env=flower_env(home), capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------------
# up / run / down

def up(state: str | os.PathLike[str], devices: int, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
       insecure: bool = False, tiny: bool = False, apis: bool = True, api_port: int = 0, timeout: float = 90,
       log: Callable[[str], None] = print) -> FleetSpec:
    """Start a SuperLink on ``host:port``, ``devices`` SuperNodes dev-1..dev-N on 127.0.0.1 and, with ``apis``,
    each device's API on 127.0.0.1:``api_port`` + i (0: free ports), serving the node's own state dir."""
    if devices < 1:
        raise DeployError(f"--devices must be at least 1, got {devices}")
    if insecure and not is_loopback(host):
        raise DeployError(f"refusing to serve {host} without TLS: use --insecure only on 127.0.0.1, "
                          f"or drop --insecure (TLS and node authentication are the default)")
    state = Path(state).resolve()
    certs.private_dir(state)
    pids = Pids(state)
    if running := pids.alive():
        raise DeployError(f"a fleet is already running from {state} ({', '.join(running)}); "
                          f"stop it with `cdcca fleet down --state {state}`")
    pids.path.unlink(missing_ok=True)
    try:
        spec = _up(state, pids, devices, host, port, insecure, tiny, timeout, log)
        if apis:
            spec.apis = start_apis(state, {n: state / "devices" / n for n in spec.devices}, pids, api_port, timeout, log)
            spec.save()
        return spec
    except BaseException:
        down(state)                  # leave nothing half-started behind
        raise


def _up(state: Path, pids: Pids, devices: int, host: str, port: int, insecure: bool, tiny: bool, timeout: float,
        log: Callable[[str], None]) -> FleetSpec:
    for sub in ("logs", "cloud", "devices", "nodes", "flwr-home"):
        certs.private_dir(state / sub)
    names = [f"dev-{i}" for i in range(1, devices + 1)]
    spec = FleetSpec(state=str(state), devices=names, host=host, port=port, insecure=insecure, tiny=tiny)
    tls = None if insecure else certs.ensure_server_cert(state / "tls", [host])
    write_connection(spec, tls.ca_cert if tls else None)

    link_cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
                "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    link_cmd += ["--insecure"] if insecure else [
        "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key), "--ssl-ca-certfile", str(tls.ca_cert),
        "--enable-supernode-auth"]
    log(f"SuperLink on {host}:{port} ({'insecure' if insecure else 'TLS, node authentication'})")
    link = spawn("superlink", link_cmd, flower_env(state / "flwr-home"), state / "logs" / "superlink.log", pids)
    host_ip, port_s = spec.address.rsplit(":", 1)
    wait_listening((host_ip.strip("[]"), int(port_s)), link, state / "logs" / "superlink.log", timeout)

    keys = {} if insecure else {n: certs.ensure_node_key(state / "keys", n) for n in names}
    if keys:
        spec.node_ids = register(spec, {n: k.public for n, k in keys.items()}, timeout)
    spec.save()
    init_devices({n: state / "devices" / n for n in names}, tiny, timeout)
    start_nodes(spec, names, pids, timeout, log)
    log(f"{devices} SuperNode(s) {'online' if spec.node_ids else 'started'}: {', '.join(names)}; state in {state}")
    return spec


def start_nodes(spec: FleetSpec, names: list[str], pids: Pids, timeout: float, log: Callable[[str], None]) -> None:
    """Start SuperNodes ``names`` of the fleet (each on its device's state dir) and wait until they are online."""
    state, since, nodes = Path(spec.state), time.time(), {}
    for name in names:
        i = spec.devices.index(name)
        node_config = (f"data-dir={_toml_str(state / 'devices' / name)} device-name={_toml_str(name)} "
                       f"device-index={i} num-devices={len(spec.devices)}")
        cmd = [*supernode_cmd(), "--superlink", spec.address, "--port", str(free_port()),
               "--node-config", node_config]
        cmd += ["--insecure"] if spec.insecure else ["--root-certificates", str(state / "tls" / "ca.pem"),
                                                     "--auth-supernode-private-key", str(state / "keys" / name)]
        env = device_env(flower_env(certs.private_dir(state / "nodes" / name)), len(spec.devices))
        nodes[name] = (cmd, env, spawn(name, cmd, env, state / "logs" / f"{name}.log", pids))
    if spec.node_ids:
        wait_online(spec, nodes, pids, since, timeout, log, names)


def restart_node(state: str | os.PathLike[str], name: str, timeout: float = 180,
                 log: Callable[[str], None] = print) -> None:
    """Start device ``name``'s SuperNode again (after a crash or a kill); its state dir and key are kept."""
    spec = FleetSpec.load(state)
    if name not in spec.devices:
        raise DeployError(f"no device {name!r} in this fleet; it has {', '.join(spec.devices)}")
    pids = Pids(Path(spec.state))
    if name in pids.alive():
        raise DeployError(f"{name}'s SuperNode is still running; stop it first")
    start_nodes(spec, [name], pids, timeout, log)


def write_connection(spec: FleetSpec, ca_cert: Path | None) -> Path:
    """flwr-home/config.toml: the flwr CLI's connection ``fleet`` to this SuperLink."""
    lines = ["[superlink]", f"default = {_toml_str(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {_toml_str(spec.address)}",
             "insecure = true" if ca_cert is None else f"root-certificates = {_toml_str(ca_cert)}"]
    path = Path(spec.state) / "flwr-home" / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def register(spec: FleetSpec, public_keys: dict[str, Path], timeout: float = 60) -> dict[str, int]:
    """``flwr supernode register`` every key (in parallel); returns node ids by name.

    A key the SuperLink already knows (a fleet brought up again on the same state) keeps its node id."""
    saved = Path(spec.state) / "fleet.json"
    known = spec.node_ids or (FleetSpec.load(spec.state).node_ids if saved.is_file() else {})
    home = Path(spec.state) / "flwr-home"
    procs = {n: subprocess.Popen([flower_bin("flwr"), "supernode", "register", str(pub), CONNECTION, "--name", n,
                                  "--format", "json"], env=flower_env(home), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
             for n, pub in public_keys.items()}
    ids = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=timeout)
        match = re.search(r'"node-id":\s*(\d+)', out)
        if match:
            ids[name] = int(match.group(1))
        elif name in known and "already" in out.lower():
            ids[name] = known[name]
        else:
            raise DeployError(f"registering {name}'s key failed: {' '.join(out.split())[-300:]}")
    return ids


def wait_online(spec: FleetSpec, nodes: dict[str, tuple[list[str], dict, subprocess.Popen]], pids: Pids,
                since: float, timeout: float, log: Callable[[str], None], names: list[str] | None = None) -> None:
    """Wait until every device has come online at the SuperLink since ``since``; restart refused ones.

    After an unclean stop the SuperLink still counts a device online until its heartbeat expires
    (2 × 30 s) and refuses its new session; the SuperNode then exits and is started again here."""
    deadline = time.monotonic() + timeout
    while (missing := sorted(set(names or spec.devices) - online_since(spec, since))):
        if time.monotonic() > deadline:
            raise DeployError(f"device(s) {', '.join(missing)} not online after {timeout:.0f} s; "
                              f"see {Path(spec.state) / 'logs'}")
        for name in missing:
            cmd, env, proc = nodes[name]
            if proc.poll() is not None:
                log_path = Path(spec.state) / "logs" / f"{name}.log"
                log(f"{name} exited ({proc.returncode}: {tail(log_path, 3)}); starting it again")
                nodes[name] = (cmd, env, spawn(name, cmd, env, log_path, pids))
        time.sleep(1.0)


def online_since(spec: FleetSpec, since: float) -> set[str]:
    """Names of the devices the SuperLink reports online with a session opened after ``since``."""
    res = _flwr(["supernode", "list", CONNECTION, "--format", "json"], spec)
    match = re.search(r"\{.*\}", res.stdout, re.S)
    names = {str(nid): n for n, nid in spec.node_ids.items()}
    cutoff = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(since - 1))
    online = set()
    for node in json.loads(match.group(0)).get("nodes", []) if match else []:
        if node.get("status") == "online" and str(node.get("online-at")) >= cutoff and str(node["node-id"]) in names:
            online.add(names[str(node["node-id"])])
    return online


@dataclass
class RunResult:
    run_id: int | None
    status: str                 # Flower's run status, e.g. "finished:completed"
    rounds: list[dict]          # the lines this run added to fleet-rounds.jsonl
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def run(state: str | os.PathLike[str], cfg: RunConfig, *, timeout: float = 3600,
        echo: Callable[[str], None] | None = print) -> RunResult:
    """``flwr run`` the fleet app with ``cfg`` (its ``fleet.rounds``; 0: until :func:`request_stop`) on the
    fleet in ``state`` and wait for it to finish. The fleet names the cloud dir, the models and the devices."""

    spec = FleetSpec.load(state)
    state = Path(spec.state)
    if not Pids(state).alive().get("superlink"):
        raise DeployError(f"the SuperLink of {state} is not running; start the fleet with `cdcca fleet up`")
    cfg = apply(cfg, {"fleet.cloud_dir": str(state / "cloud"), "model.tiny": spec.tiny, "fleet.min_nodes": len(spec.devices)})
    config_path = state / "run-config.toml"
    config_path.write_text(flat_toml(cfg))
    (state / "cloud" / STOP_FILE).unlink(missing_ok=True)     # a stop asked of an earlier run does not end this one
    (state / "cloud" / READY_FILE).unlink(missing_ok=True)    # the run's ServerApp writes it once it is ready
    round_log = state / "cloud" / ROUND_LOG
    before = len(round_log.read_text().splitlines()) if round_log.is_file() else 0
    log_path = state / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    cmd = [flower_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(config_path)]
    run_id = None
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, env=flower_env(state / "flwr-home"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            for line in proc.stdout:
                logf.write(line)
                if echo:
                    echo(line.rstrip("\n"))
                if run_id is None and (m := re.search(r"started run (\d+)", line)):
                    run_id = int(m.group(1))
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmd, timeout)
            proc.wait()
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGTERM)
            if run_id is not None:
                _flwr(["stop", str(run_id), CONNECTION], spec)
            raise DeployError(f"run {run_id} stopped after {timeout:.0f} s; log: {log_path}") from None
    status = run_status(spec, run_id) if run_id is not None else f"not started (flwr run exited {proc.returncode})"
    lines = round_log.read_text().splitlines()[before:] if round_log.is_file() else []
    return RunResult(run_id, status, [json.loads(s) for s in lines if s.strip()], log_path)


def run_status(spec: FleetSpec, run_id: int) -> str:
    res = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], spec)
    match = re.search(r"\{.*\}", res.stdout, re.S)
    try:
        runs = json.loads(match.group(0))["runs"] if match else []
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown ({' '.join(res.stdout.split())[-200:]})"


def request_stop(state: str | os.PathLike[str]) -> Path:
    """Ask the fleet's running ServerApp to end after its current round (it polls for this file)."""

    spec = FleetSpec.load(state)
    path = Path(spec.state) / "cloud" / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{time.time()}\n")
    return path


def down(state: str | os.PathLike[str], *, timeout: float = 10) -> list[str]:
    """Stop every process group ``up`` started (SIGTERM, then SIGKILL after ``timeout`` s); returns names."""
    pids = Pids(Path(state).resolve())
    # a pid whose process now started at another time was recycled: not ours, leave it alone
    ours = pids.ours()
    # SuperNodes first, so each can close its session at the SuperLink; a SuperLink stopped first leaves
    # them marked online, and the SuperLink refuses their next session until their heartbeat expires
    nodes = {n: pid for n, pid in ours.items() if n != "superlink"}
    link = {n: pid for n, pid in ours.items() if n == "superlink"}
    stopped = stop_groups(nodes, timeout) + stop_groups(link, timeout)
    if (Path(state) / "fleet.json").is_file():      # the SuperLink starts its ServerApp in a session of its own
        spec = FleetSpec.load(state)
        apps = pids_with_args("flwr-serverapp", f"--runtime-api-address {spec.address}")
        stopped += stop_groups({f"serverapp-{pid}": pid for pid in apps}, timeout, group=False)
    pids.path.unlink(missing_ok=True)
    return sorted(stopped)
