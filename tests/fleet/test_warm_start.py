"""ClientApps started warm: the shim hands its arguments to the warm parent, which forks Flower's own
flwr-clientapp with them; without a parent, the shim starts the real program cold."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cdcca.fleet import warm_start


def _fake_real(tmp_path: Path) -> Path:
    real = tmp_path / "real-clientapp"
    real.write_text(f"#!{sys.executable}\nimport sys\nprint('cold', *sys.argv[1:])\n")
    real.chmod(0o755)
    return real


def test_without_a_warm_parent_the_shim_starts_the_real_clientapp_cold(tmp_path):
    shim = warm_start.write_shim(tmp_path / "bin", str(_fake_real(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k != warm_start.SOCKET_ENV}
    out = subprocess.run([str(shim), "--token", "t1"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "cold --token t1"
    gone = {**env, warm_start.SOCKET_ENV: str(tmp_path / "no-such-socket")}       # a parent that went away
    out = subprocess.run([str(shim), "--token", "t2"], env=gone, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "cold --token t2"


def _wait_for(path: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.1)


def test_the_warm_parent_forks_flowers_clientapp_with_the_shims_arguments_and_cleans_up(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="cdcca-warm-test-"))
    sock = folder / "socket"
    parent = subprocess.Popen([sys.executable, "-m", "cdcca.fleet.warm_start", str(sock)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(sock)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:       # not a list of strings: refused,
            bad.connect(str(sock))
            bad.sendall(b'{"argv": 1}')
            bad.shutdown(socket.SHUT_WR)
            assert bad.recv(32) == b""                                       # nothing forked, parent goes on
        shim = warm_start.write_shim(tmp_path / "bin", str(_fake_real(tmp_path)))
        env = {**os.environ, warm_start.SOCKET_ENV: str(sock)}
        out = subprocess.run([str(shim), "--help"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "cold" not in out.stdout              # handed over, not started cold
        time.sleep(3)                                                        # the forked child prints its usage
    finally:
        parent.send_signal(signal.SIGTERM)
        output, _ = parent.communicate(timeout=30)
    assert "usage: flwr-clientapp" in output
    assert parent.returncode == 0 and not folder.exists()
