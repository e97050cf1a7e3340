"""ClientApp processes forked from a warm parent instead of started cold.

Flower's SuperNode runs every message in a fresh ``flwr-clientapp`` process (its SuperExec starts it by
name from ``PATH`` and does not wait for it). A cold start imports flwr, torch and the device runtime before
the handler runs: seconds of CPU per message and per device, on every status poll, uplink and apply. Here a
warm parent (:func:`serve`) imports all of that once and forks one child per message; the child runs
Flower's own ``flwr-clientapp`` entry point with the same arguments, so the message is handled exactly as
before, only started warm.

    SuperExec ──► flwr-clientapp (the shim of :func:`write_shim`, stdlib only, ~30 ms)
                    ├─ the warm parent answers on CDCCA_WARM_SOCKET ──► fork ──► flwr-clientapp main
                    └─ no answer: exec the real flwr-clientapp (a cold start, as Flower does it)

The parent imports only: no torch operation runs before a fork, so the children start with no thread
pools to inherit. It exits when the SuperNode that started it is gone.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

SOCKET_ENV = "CDCCA_WARM_SOCKET"
# imported once by the parent: what every cdcca ClientApp step needs before its handler runs
PRELOAD = ("torch", "flwr.supernode.cli.flwr_clientapp", "cdcca.fleet.flower", "cdcca.runtime.device",
           "cdcca.runtime.protocol", "cdcca.fleet.traffic")
PARENT_CHECK_S = 1.0

SHIM = '''#!{python} -S
# flwr-clientapp, started warm: forked by the parent on {socket_env}, or the real one started cold.
import json, os, socket, sys
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(os.environ["{socket_env}"])
    conn.sendall(json.dumps(sys.argv[1:]).encode())
    conn.shutdown(socket.SHUT_WR)
    if conn.recv(32).strip().isdigit():
        sys.exit(0)
except (OSError, KeyError):
    pass
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
'''


def write_shim(bin_dir: Path, real_clientapp: str) -> Path:
    """``bin_dir/flwr-clientapp``: the stand-in the SuperExec starts (put ``bin_dir`` first on its PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flwr-clientapp"
    path.write_text(SHIM.format(python=sys.executable, socket_env=SOCKET_ENV, real=real_clientapp))
    path.chmod(0o755)
    return path


def _run_clientapp(argv: list[str]) -> int:
    """In the forked child: Flower's flwr-clientapp main with ``argv``; its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)       # the parent reaps by ignoring; the handler may wait on its own
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    sys.argv = ["flwr-clientapp", *argv]
    try:
        flwr_clientapp()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _read_argv(conn: socket.socket) -> list[str]:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    argv = json.loads(data)
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError("a start request is a JSON list of strings")
    return argv


def _stop(signum, frame) -> None:
    raise SystemExit(0)


def serve(socket_path: Path, parent_pid: int) -> None:
    """The warm parent: import :data:`PRELOAD`, then fork one flwr-clientapp per request on ``socket_path``
    until ``parent_pid`` (the SuperNode) is gone or it is told to stop; then it removes the socket's folder
    (a private one, made for it by :func:`start_warm_parent`)."""
    signal.signal(signal.SIGTERM, _stop)
    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)        # children are reaped by the kernel
    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    server.listen(16)
    server.settimeout(PARENT_CHECK_S)
    try:
        while os.getppid() == parent_pid:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                try:
                    argv = _read_argv(conn)
                except (OSError, ValueError):
                    continue                        # the shim then starts the real one
                pid = os.fork()
                if pid == 0:
                    server.close()
                    conn.close()
                    code = _run_clientapp(argv)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
                conn.sendall(b"%d\n" % pid)
    finally:
        server.close()
        shutil.rmtree(socket_path.parent, ignore_errors=True)


def start_warm_parent(real_clientapp: str) -> dict[str, str]:
    """Start the warm parent of this process (the SuperNode's) and return the environment changes that make
    its SuperExec start ClientApps through it: the shim first on PATH, the socket's path."""
    folder = Path(tempfile.mkdtemp(prefix="cdcca-warm-"))        # 0700, short enough for a socket path
    write_shim(folder / "bin", real_clientapp)
    subprocess.Popen([sys.executable, "-m", "cdcca.fleet.warm_start", str(folder / "socket")])
    return {SOCKET_ENV: str(folder / "socket"), "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}


def main() -> None:
    """``python -m cdcca.fleet.warm_start SOCKET``: the warm parent of the SuperNode that started it."""
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cdcca.fleet.warm_start SOCKET_PATH")
    serve(Path(sys.argv[1]), os.getppid())


if __name__ == "__main__":
    main()
