"""The Flower deployment: certificates and keys, the ServerApp's round helpers, and a real fleet.

The integration test starts a SuperLink and two SuperNodes on 127.0.0.1 with TLS and node
authentication (``cdcca.fleet.deploy.up``), runs two rounds on tiny models and stops everything.
Run it alone with ``pytest -m integration tests/test_fleet_flower.py``.
"""

import json
import math
import os
import signal
import socket
import ssl
import stat
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from cdcca.config import RunConfig, apply, from_flat, resolve
from cdcca.fleet import certs, deploy
from cdcca.fleet.flower import ROUND_LOG, _record, device_home
from cdcca.fleet.server import RoundLog, claims_own_name, cloud_rounds, join_group
from cdcca.runtime.protocol import UplinkMessage

# ---------------------------------------------------------------------------------------------------
# certificates and node keys


def test_server_cert_is_signed_by_the_ca_and_names_loopback_and_the_host(tmp_path):
    tls = certs.make_server_cert(tmp_path / "tls", ["10.1.2.3", "cloud.example.org"])
    cert = certs.verify_server_cert(tls)              # raises unless signed by ca.pem and valid now
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "cloud.example.org"]
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_material_is_0600_in_0700_folders(tmp_path):
    certs.make_server_cert(tmp_path / "tls")
    certs.make_node_key(tmp_path / "keys", "dev-1")
    for folder in (tmp_path / "tls", tmp_path / "keys"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]


def test_node_key_is_an_openssh_ecdsa_p384_pair(tmp_path):
    key = certs.make_node_key(tmp_path, "dev-7")
    private = load_ssh_private_key(key.private.read_bytes(), password=None)
    public = load_ssh_public_key(key.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    kind, _, comment = key.public.read_text().split()
    assert (kind, comment) == ("ecdsa-sha2-nistp384", "dev-7")
    assert private.public_key().public_numbers() == public.public_numbers()


def test_ensure_keeps_the_ca_and_node_keys_and_reissues_for_a_new_host(tmp_path):
    first = certs.ensure_server_cert(tmp_path, ["10.0.0.1"])
    ca, server = first.ca_cert.read_bytes(), first.cert.read_bytes()
    assert certs.ensure_server_cert(tmp_path, ["10.0.0.1"]).cert.read_bytes() == server      # still valid: kept
    again = certs.ensure_server_cert(tmp_path, ["10.0.0.2"])                                    # new name: re-issued
    assert again.cert.read_bytes() != server and again.ca_cert.read_bytes() == ca
    key = certs.ensure_node_key(tmp_path / "keys", "dev-1")
    assert certs.ensure_node_key(tmp_path / "keys", "dev-1").public.read_bytes() == key.public.read_bytes()


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_a_tls_client_trusting_the_ca_accepts_the_server(tmp_path, name):
    tls = certs.make_server_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls.cert, tls.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve():
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"ok")
        threading.Thread(target=serve, daemon=True).start()
        client_ctx = ssl.create_default_context(cafile=str(tls.ca_cert))     # verifies chain and hostname
        with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=name) as s:
            assert s.recv(2) == b"ok"


# ---------------------------------------------------------------------------------------------------
# the ServerApp's helpers, with a stand-in cloud


def uplink(packet):
    return UplinkMessage(device_id="dev-1", packet=packet, status={"version": 2, "hash": "h2"})


def test_a_node_speaks_only_for_its_registered_device():
    import torch

    from cdcca import wire

    packet = wire.encode("uplink", {"x": torch.zeros(1)}, {"device_id": "dev-1"})
    assert claims_own_name(1, "dev-1", "dev-1", packet)
    assert claims_own_name(1, "", "dev-1", None)                    # an insecure fleet has no names
    assert not claims_own_name(1, "dev-2", "dev-1", packet)         # registered as another device
    assert not claims_own_name(1, "dev-2", "dev-2", packet)         # packet for another device
    assert not claims_own_name(1, "", "", None)
    assert not claims_own_name(1, "dev-1", "dev-1", b"not a packet")


def test_a_rejected_uplink_leaves_only_that_device_out():
    from cdcca.wire import PacketError

    class Picky:
        def receive(self, packet):
            if packet == b"bad":
                raise PacketError("truncated")
            return ["s1"]

        def mirror_hash(self, device_id):
            return "h2"

        def run_round(self, device_id, study=None, only=None, should_stop=None):
            return b"update"

    ups = {1: uplink(b"bad"), 2: uplink(b"uplink")}
    assert list(cloud_rounds(Picky(), ups)) == [2]


def test_a_run_with_a_group_puts_every_device_of_the_round_in_it():
    class Groups:
        def __init__(self):
            self.groups = {"dev-2": "site-a"}

        def group_of(self, device_id):
            return self.groups.get(device_id)

        def set_group(self, device_id, group):
            self.groups[device_id] = group

    cloud = Groups()
    join_group(cloud, {1: uplink(b"x")}, "")
    assert cloud.groups == {"dev-2": "site-a"}
    join_group(cloud, {1: uplink(b"x")}, "site-a")
    assert cloud.groups == {"dev-2": "site-a", "dev-1": "site-a"}


def test_run_config_defaults_are_the_app_pyproject_defaults():
    from flwr.common.config import flatten_dict

    with open(deploy.APP_DIR / "pyproject.toml", "rb") as f:
        app_config = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    assert from_flat(app_config) == RunConfig() == from_flat({})
    with pytest.raises(ValueError, match=r"unknown setting 'fleet\.round'"):
        from_flat({"fleet.round": 3})


def test_a_node_finds_its_device_state_deployed_or_simulated(tmp_path):
    cfg = apply(RunConfig(), {"fleet.devices_dir": str(tmp_path)})
    deployed = {"data-dir": "/srv/dev", "device-name": "dev-3", "device-index": 2, "num-devices": 4}
    assert device_home(deployed, cfg) == (Path("/srv/dev"), "dev-3", 2, 4)
    assert device_home({"partition-id": 4, "num-partitions": 50}, cfg) == (tmp_path / "dev-5", "dev-5", 4, 50)
    with pytest.raises(ValueError, match="no data-dir"):
        device_home({}, cfg)


def test_round_log_continues_after_the_last_round_and_writes_strict_json(tmp_path):
    log = RoundLog(tmp_path / ROUND_LOG)
    assert log.next_round() == 0
    log.append({"round": 0, "devices": {"dev-1": {"online_mc": math.nan}}})
    log.append({"round": 1, "devices": {}})
    assert log.next_round() == 2
    first = json.loads((tmp_path / ROUND_LOG).read_text().splitlines()[0])
    assert first["devices"]["dev-1"]["online_mc"] is None


def test_records_keep_what_flower_can_carry():
    import numpy as np

    rec = _record({"hash": "ab", "version": np.int64(3), "ok": True, "versions": [0, 1], "blob": b"x",
                   "nested": {"a": 1}, "none": None, "mixed": [1, "a"]})
    assert dict(rec) == {"hash": "ab", "version": 3, "ok": True, "versions": [0, 1], "blob": b"x"}


# ---------------------------------------------------------------------------------------------------
# deployment guards


def test_serving_beyond_loopback_without_tls_is_refused(tmp_path):
    with pytest.raises(deploy.DeployError, match=r"refusing to serve 0\.0\.0\.0 without TLS"):
        deploy.up(tmp_path, 1, host="0.0.0.0", insecure=True)
    assert not (tmp_path / "pids.json").exists()


def test_every_flower_process_runs_quiet_and_installs_nothing(tmp_path):
    env = deploy.flower_env(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_HOME"] == str(tmp_path)


# ---------------------------------------------------------------------------------------------------
# a real fleet: SuperLink + 2 SuperNodes, TLS, node authentication, tiny models


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    state = tmp_path_factory.mktemp("fleet")
    try:
        spec = deploy.up(state, 2, port=deploy.free_port(), tiny=True, log=lambda _: None)
        yield spec
    finally:
        deploy.down(state)
        leftover = [line for line in subprocess.run(["ps", "-eo", "pgid,args"], capture_output=True,
                                                    text=True).stdout.splitlines() if str(state) in line]
        assert not leftover, leftover


@pytest.mark.integration
def test_a_supernode_with_an_unregistered_key_is_refused(fleet, tmp_path):
    rogue = certs.make_node_key(tmp_path / "keys", "rogue")
    cmd = [deploy.flower_bin("flower-supernode"), "--superlink", fleet.address, "--port", str(deploy.free_port()),
           "--root-certificates", str(fleet.state + "/tls/ca.pem"), "--auth-supernode-private-key", str(rogue.private),
           "--max-retries", "1", "--node-config", f'data-dir="{tmp_path}/rogue-device" device-name="dev-1"']
    with open(tmp_path / "rogue.log", "wb") as log:      # a file, not a pipe: its SuperExec child keeps a pipe open
        proc = subprocess.Popen(cmd, env=deploy.flower_env(tmp_path / "home"), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        proc.wait(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out = (tmp_path / "rogue.log").read_text(errors="replace")
    assert proc.returncode != 0
    assert "Failed to activate SuperNode" in out or "Failed to initialize the connection" in out, out[-2000:]
    assert not (tmp_path / "rogue-device").exists()                       # no ClientApp ever ran for it


@pytest.mark.integration
def test_each_device_gets_its_own_update_and_matches_its_mirror_every_round(fleet):
    from cdcca import wire
    from cdcca.runtime.adapter_store import AdapterStore
    from cdcca.runtime.cloud import CloudRuntime

    cfg = resolve("tiny", sets=["fleet.rounds=2", 'fleet.traffic="stream"', "akd.prefix.epochs=2", "akd.labels.epochs=1",
                                "akd.labels.batch_size=4"])
    result = deploy.run(fleet.state, cfg, timeout=400, echo=None)
    assert result.ok, f"{result.status}; log: {result.log_path}"
    assert [r["round"] for r in result.rounds] == [0, 1]
    for row in result.rounds:
        assert set(row["devices"]) == {"dev-1", "dev-2"}
        for dev in row["devices"].values():
            assert dev["in_sync"] and dev["version"] == row["round"] + 1
            assert dev["uploaded"] > 0 and dev["update_bytes"] > 0 and dev["outbox"] == 0
            assert not dev["resynced"] and not dev["caught_up"]
        assert row["devices"]["dev-1"]["hash"] != row["devices"]["dev-2"]["hash"]   # each its own update

    # checked again from the files: each device's store equals its cloud mirror, built from its own packets
    cloud = CloudRuntime(f"{fleet.state}/cloud", akd=None, initial_state={})
    for name in ("dev-1", "dev-2"):
        store = AdapterStore(f"{fleet.state}/devices/{name}/adapters")
        assert (store.version, store.hash) == (2, cloud.mirror_hash(name))
        for v in (1, 2):
            meta = wire.describe((f := (cloud.dir / "devices" / name / f"update-v{v}.pkt")).read_bytes())["meta"]
            assert meta["device_id"] == name, f
    cloud.close()


def test_the_serverapp_reads_the_whole_run_config_it_was_given(tmp_path):
    """`cdcca fleet run --preset quick --set ...` writes the resolved config flat; the ServerApp reads it back."""
    from cdcca.config import flat_toml

    tuned = resolve("quick", sets=["akd.prefix.epochs=3", "dwc.budget_bytes=65536"])
    (tmp_path / "run.toml").write_text(flat_toml(tuned))
    from flwr.common.config import parse_config_args

    read = from_flat(parse_config_args([str(tmp_path / "run.toml")]))
    assert read == tuned and read.akd.prefix.epochs == 3 and read.dwc.budget_bytes == 64 * 1024
    assert read.akd.prefix.lr == resolve("quick").akd.prefix.lr          # what was not named stays the preset's


def test_a_round_starts_on_queued_uploads_or_on_time_and_never_with_nothing_queued(tmp_path):
    from cdcca.fleet.server import RoundTrigger

    now = [0.0]

    def sleep(s):
        now[0] += s

    queue = iter([0, 3, 12])                      # the outboxes fill up between two asks
    trigger = RoundTrigger(resolve(sets=["fleet.min_uploads=10"]), lambda: next(queue),
                           tmp_path / "stop", sleep=sleep, clock=lambda: now[0])
    assert trigger.wait() == "uploads" and now[0] == 10.0
    timer = RoundTrigger(resolve(sets=["fleet.round_every_s=60.0"]), lambda: 0 if now[0] < 100 else 1,
                         tmp_path / "stop", sleep=sleep, clock=lambda: now[0])
    assert timer.wait() == "time" and now[0] == 100.0          # due at 70 s, but nothing was queued until 100 s
    assert RoundTrigger(RunConfig(), lambda: 0, tmp_path / "stop").wait() == "next"
    (tmp_path / "stop").touch()
    assert timer.wait() is None                                 # asked to stop: no more rounds
