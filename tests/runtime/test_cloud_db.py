"""The cloud's torch-free inbox: ``cdcca cloud receive`` on an existing state checks and commits a packet
without importing torch (src/cdcca/runtime/cloud_db.py, src/cdcca/uplink/check.py), as strictly as
``decode_uplink``; the numpy basis digest is the torch one."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import pytest
import torch

from cdcca import wire
from cdcca.runtime.cloud import CloudRuntime
from cdcca.uplink import TokenBasis, UplinkSample, UTSConfig, build_uplink, decode_uplink, default_token_basis
from cdcca.uplink.check import check_uplink
from cdcca.uplink.codes import default_basis_info, read_basis_info
from cdcca.uplink.config import TOKEN_BASIS_PATH

RECEIVE = """
import json, sys
from typer.testing import CliRunner
from cdcca.cli.main import app
result = CliRunner().invoke(app, ["cloud", "receive", sys.argv[1], "--state", sys.argv[2], "--ack-out", sys.argv[3]])
print(json.dumps({"exit": result.exit_code, "output": result.output, "torch": "torch" in sys.modules}))
"""


def _packet(device_id: str = "dev-7", n: int = 3) -> bytes:
    g = torch.Generator().manual_seed(0)
    samples = [UplinkSample(f"s{i}", torch.randn(49, 16, generator=g), f"q{i}", f"a{i}", 0.5,
                            keep=torch.rand(49, generator=g) < 0.5) for i in range(n)]
    return build_uplink(samples, UTSConfig(), device_id=device_id, adapter_version="0")


def _receive_in_a_fresh_process(tmp_path, packet: bytes) -> dict:
    (tmp_path / "up.pkt").write_bytes(packet)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", RECEIVE, str(tmp_path / "up.pkt"), str(tmp_path / "cloud"),
                          str(tmp_path / "ack.json")], capture_output=True, text=True, env=env, timeout=120, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_cloud_receive_on_an_existing_state_acknowledges_the_ids_without_importing_torch(tmp_path):
    CloudRuntime.open(tmp_path / "cloud", tiny=True).close()           # the state exists (no model is loaded)
    packet = _packet()
    result = _receive_in_a_fresh_process(tmp_path, packet)
    assert result == {"exit": 0, "output": '{"acknowledged": 3}\n', "torch": False}
    assert json.loads((tmp_path / "ack.json").read_text()) == ["s0", "s1", "s2"]
    db = sqlite3.connect(tmp_path / "cloud" / "cloud.sqlite")
    assert db.execute("SELECT sample_id, device_id FROM samples ORDER BY sample_id").fetchall() == \
        [("s0", "dev-7"), ("s1", "dev-7"), ("s2", "dev-7")]
    assert [p.name for p in (tmp_path / "cloud" / "uplinks").iterdir()] == [f"{hashlib.sha256(packet).hexdigest()}.pkt"]
    cloud = CloudRuntime.open(tmp_path / "cloud")                       # the runtime reads what the inbox stored
    assert cloud.pending_samples("dev-7") == 3


def test_cloud_receive_refuses_a_tampered_packet_without_torch_and_stores_nothing(tmp_path):
    CloudRuntime.open(tmp_path / "cloud", tiny=True).close()
    bad = bytearray(_packet())
    bad[-1] ^= 1
    result = _receive_in_a_fresh_process(tmp_path, bytes(bad))
    assert result["exit"] != 0 and not result["torch"] and "SHA-256 mismatch" in result["output"]
    assert not list((tmp_path / "cloud").glob("uplinks/*.pkt"))


def test_the_runtime_and_the_inbox_commit_the_same_way(tmp_path):
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True)
    packet = _packet()
    assert cloud.receive(packet) == ["s0", "s1", "s2"] == check_uplink(packet).sample_ids
    assert cloud.receive(packet) == ["s0", "s1", "s2"] and cloud.pending_samples("dev-7") == 3    # idempotent


def test_the_numpy_basis_digest_equals_the_torch_one(tmp_path):
    assert read_basis_info(TOKEN_BASIS_PATH).digest == default_token_basis().digest == default_basis_info().digest
    q = torch.linalg.qr(torch.randn(96, 8, generator=torch.Generator().manual_seed(3)))[0].T * 3.3
    basis = TokenBasis(torch.randn(96), q, q.flip(0))
    info = read_basis_info(basis.save(tmp_path / "b.safetensors"))
    assert (info.digest, info.k, info.dim) == (basis.digest, 8, 96)


def test_the_numpy_decoder_returns_what_the_torch_decoder_returns_and_refuses_bfloat16():
    packet = _packet()
    arrays, tensors = wire.decode_arrays(packet).tensors, wire.decode(packet).tensors
    assert sorted(arrays) == sorted(tensors)
    for name, t in tensors.items():
        assert arrays[name].tobytes() == t.numpy().tobytes() and str(arrays[name].dtype) == str(t.dtype)[6:]
    with pytest.raises(wire.PacketError, match="bfloat16"):
        wire.decode_arrays(wire.encode("uplink", {"h": torch.zeros(2, dtype=torch.bfloat16)}))


def test_a_checked_uplink_builds_the_batch_decode_uplink_builds():
    packet = _packet()
    batch = decode_uplink(packet)
    checked = check_uplink(packet)
    assert (checked.sample_ids, checked.device_id, checked.shape) == (batch.sample_ids, batch.device_id, (3, 49, 16))
    assert torch.equal(torch.from_numpy(checked.positions), batch.sent.nonzero()[:, 1])


def test_a_mean_filled_packet_must_match_the_token_statistics_before_it_is_stored():
    """A 'mean' fill draws the dropped slots from the cloud's token statistics: a packet of another grid
    or width is refused by the check itself, so the torch-free inbox never stores a packet its round
    could not build."""
    from cdcca.wire import PacketError

    packet = _packet()                                     # 49 × 16 tokens; the packaged statistics are 49 × 1280
    with pytest.raises(PacketError, match="fill 'mean' needs token statistics of shape \\(49, 16\\)"):
        check_uplink(packet, fill="mean")
    assert check_uplink(packet, fill="mean", stats_shape=(49, 16)).fill == "mean"
    assert check_uplink(packet).fill == "mask"
