"""Device-side adapter store: atomic versioned apply, refusal of stale packets, crash safety."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cdcca import wire
from cdcca.adapter_state import state_hash
from cdcca.downlink import DWCConfig, build_resync, build_update
from cdcca.runtime import adapter_store as store_mod
from cdcca.runtime.adapter_store import AdapterStore, StaleBaseError, StoreError, WrongDeviceError
from cdcca.wire import PacketError

SHAPES = {"l0.lora_A": (8, 256), "l0.lora_B": (256, 8), "norm.weight": (32,)}
CFG = DWCConfig(budget_bytes=4000)


def make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in SHAPES.items()}


def perturb(state, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()}


class Cloud:
    """Just enough of the cloud side: a mirror per device, a target and a residual."""

    def __init__(self, state, device_id="dev-1", version=0):
        self.mirror, self.target, self.residual = dict(state), dict(state), None
        self.version, self.device_id = version, device_id

    def update(self, seed: int) -> bytes:
        self.target = perturb(self.target, seed)
        packet, self.mirror, self.residual, _ = build_update(
            self.mirror, self.target, self.residual, CFG, device_id=self.device_id,
            base_version=self.version, new_version=self.version + 1)
        self.version += 1
        return packet


def snapshot(d) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.name != "LOCK"}


@pytest.fixture
def setup(tmp_path):
    s0 = make_state(0)
    st = AdapterStore.init(tmp_path / "store", s0, version=0, keep=5, device_id="dev-1")
    return st, Cloud(s0), tmp_path / "store"


def test_updates_apply_in_order_and_each_version_matches_the_cloud_mirror(setup):
    st, cloud, d = setup
    for i in range(1, 6):
        report = st.apply_update(cloud.update(i))
        assert report["status"] == "applied" and report["version"] == i
        v, state, h = st.current()
        assert v == i and h == state_hash(state) == state_hash(cloud.mirror)
    assert st.versions() == [1, 2, 3, 4, 5]
    assert json.loads((d / "CURRENT").read_text()) == {"version": 5, "hash": st.hash}
    reopened = AdapterStore(d)
    assert reopened.current()[0] == 5 and reopened.recovery_note is None


def test_version_files_carry_version_hash_created_and_parent_metadata(setup):
    st, cloud, d = setup
    st.apply_update(cloud.update(1))
    from safetensors import safe_open
    with safe_open(str(d / "v000001.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["version"] == "1" and meta["parent"] == "0" and meta["hash"] == st.hash
    assert meta["created"].endswith("Z")


def test_packet_for_the_wrong_base_is_refused_and_changes_nothing(setup):
    st, cloud, d = setup
    st.apply_update(cloud.update(1))
    stale = cloud.update(2)  # 1 -> 2 ...
    cloud.update(3)  # ... but the device never got it, and now the cloud made 2 -> 3
    skipped = cloud.update(4)  # 3 -> 4 cannot apply on version 1
    before = snapshot(d)
    with pytest.raises(StaleBaseError, match="resync"):
        st.apply_update(skipped)
    assert snapshot(d) == before and st.current()[0] == 1
    # same version number, different content: also refused by the base hash
    other = Cloud(make_state(99))
    other.version = 1
    with pytest.raises(StaleBaseError):
        st.apply_update(other.update(5))
    assert snapshot(d) == before
    assert st.apply_update(stale)["version"] == 2  # the right packet still applies


def test_stale_base_error_is_a_packet_error():
    assert issubclass(StaleBaseError, PacketError) and issubclass(WrongDeviceError, PacketError)


def test_packet_for_another_device_is_refused(setup):
    st, cloud, d = setup
    cloud.device_id = "dev-2"
    before = snapshot(d)
    with pytest.raises(WrongDeviceError):
        st.apply_update(cloud.update(1))
    assert snapshot(d) == before


def test_result_hash_mismatch_is_refused_and_changes_nothing(setup):
    st, cloud, d = setup
    p = wire.decode(cloud.update(1))
    forged = wire.encode("update", p.tensors, {**p.meta, "result_hash": "0" * 64})
    before = snapshot(d)
    with pytest.raises(PacketError, match="hash"):
        st.apply_update(forged)
    assert snapshot(d) == before and st.current()[0] == 0


def test_corrupted_packet_is_refused_and_changes_nothing(setup):
    st, cloud, d = setup
    packet = bytearray(cloud.update(1))
    packet[len(packet) // 2] ^= 0x01
    before = snapshot(d)
    with pytest.raises(PacketError):
        st.apply_update(bytes(packet))
    assert snapshot(d) == before


class _CrashOnce:
    """os.replace that raises (a power cut) on its n-th call, then behaves."""

    def __init__(self, n: int):
        self.n, self.calls, self.real = n, 0, os.replace

    def __call__(self, src, dst):
        self.calls += 1
        if self.calls == self.n:
            raise OSError("simulated power cut")
        return self.real(src, dst)


@pytest.mark.parametrize("crash_at,what", [(1, "version file rename"), (2, "CURRENT rename")])
def test_crash_between_write_and_rename_leaves_the_previous_version_loadable(setup, monkeypatch, crash_at, what):
    st, cloud, d = setup
    st.apply_update(cloud.update(1))
    v1_hash = st.hash
    packet = cloud.update(2)
    crash = _CrashOnce(crash_at)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        st.apply_update(packet)
    monkeypatch.undo()
    assert st.current()[0] == 1  # in memory: unchanged
    (d / ".v000002.safetensors.abc123.tmp").write_bytes(b"half-written")  # what a real cut leaves
    reopened = AdapterStore(d)
    v, state, h = reopened.current()
    assert (v, h) == (1, v1_hash) and state_hash(state) == h
    assert not any(f.name.endswith(".tmp") for f in d.iterdir())  # stray temp files cleaned
    assert reopened.apply_update(packet)["version"] == 2  # and the update can be retried


def test_keeps_only_the_last_k_versions(tmp_path):
    s0 = make_state(0)
    st = AdapterStore.init(tmp_path / "s", s0, keep=3)
    cloud = Cloud(s0)
    pruned = []
    for i in range(1, 7):
        pruned += st.apply_update(cloud.update(i))["pruned"]
    assert st.versions() == [4, 5, 6] and pruned == [0, 1, 2, 3]
    assert AdapterStore(tmp_path / "s", keep=2).keep == 2


def test_rollback_to_any_kept_version_repoints_current_without_a_new_version(setup):
    st, cloud, d = setup
    hashes = {0: st.hash}
    for i in range(1, 5):
        st.apply_update(cloud.update(i))
        hashes[i] = st.hash
    for target in (2, 0, 4, 1):
        report = st.rollback(target)
        assert report["status"] == "rolled_back" and report["version"] == target
        v, state, h = AdapterStore(d).current()
        assert (v, h) == (target, hashes[target]) and state_hash(state) == h
    assert st.versions() == [0, 1, 2, 3, 4]
    assert st.rollback(1)["status"] == "already_current"
    with pytest.raises(StoreError, match="not kept"):
        st.rollback(17)


def test_update_after_rollback_replaces_the_abandoned_branch(setup):
    st, cloud, _d = setup
    for i in range(1, 4):
        st.apply_update(cloud.update(i))
    st.rollback(1)
    with pytest.raises(StaleBaseError):
        st.apply_update(cloud.update(9))  # the cloud still thinks the device is at 3
    resync = build_resync(cloud.mirror, device_id="dev-1", version=cloud.version)
    report = st.apply_resync(resync)
    assert report["status"] == "installed" and report["pruned"] == [2, 3]  # old 2, 3 abandoned
    assert st.versions() == [0, 1, 4] and st.current()[2] == state_hash(cloud.mirror)
    assert st.apply_update(cloud.update(10))["version"] == 5


def test_resync_installs_a_dense_state_as_a_new_version(setup):
    st, cloud, d = setup
    fresh = make_state(42)
    report = st.apply_resync(build_resync(fresh, device_id="dev-1", version=7))
    assert report == {"status": "installed", "version": 7, "hash": state_hash(fresh), "pruned": []}
    v, state, h = AdapterStore(d).current()
    assert v == 7 and h == state_hash(fresh) and all(torch.equal(state[k], fresh[k]) for k in fresh)
    assert st.apply_resync(build_resync(fresh, device_id="dev-1", version=7))["status"] == "already_applied"
    with pytest.raises(PacketError, match="not above"):
        st.apply_resync(build_resync(make_state(43), device_id="dev-1", version=3))
    with pytest.raises(PacketError, match="expected a 'resync'"):
        st.apply_resync(cloud.update(1))


def test_a_packet_decoded_once_applies_like_its_bytes(setup):
    """``apply`` takes the packet a caller already decoded to route it (update or resync)."""
    st, cloud, _ = setup
    packet = cloud.update(1)
    report = st.apply(wire.decode(packet), nbytes=len(packet))
    assert report["status"] == "applied" and report["packet_bytes"] == len(packet)
    assert st.hash == state_hash(cloud.mirror)
    fresh = make_state(42)
    assert st.apply(wire.decode(build_resync(fresh, device_id="dev-1", version=7)))["status"] == "installed"
    with pytest.raises(PacketError, match="applies only 'update' or 'resync'"):
        st.apply(wire.decode(wire.encode("uplink", {"x": torch.zeros(1)})))


def test_reapplying_the_same_update_is_idempotent(setup):
    st, cloud, d = setup
    packet = cloud.update(1)
    assert st.apply_update(packet)["status"] == "applied"
    before = snapshot(d)
    report = st.apply_update(packet)
    assert report == {"status": "already_applied", "version": 1, "hash": st.hash}
    assert snapshot(d) == before


def test_open_of_a_missing_store_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(StoreError) as e:
        AdapterStore(tmp_path / "nope")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nope") in msg and "AdapterStore.init" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not an adapter store"):
        AdapterStore(tmp_path / "empty")


def test_init_refuses_an_existing_store_unless_forced(setup):
    st, cloud, d = setup
    st.apply_update(cloud.update(1))
    with pytest.raises(StoreError, match="force=True"):
        AdapterStore.init(d, make_state(5))
    fresh = AdapterStore.init(d, make_state(5), version=3, force=True)
    assert fresh.versions() == [3] and fresh.current()[2] == state_hash(make_state(5))
    assert fresh.device_id is None


@pytest.mark.parametrize("damage", ["garbage CURRENT", "missing CURRENT", "missing file", "corrupt file"])
def test_broken_current_falls_back_to_the_newest_valid_version_and_says_so(setup, damage, caplog):
    st, cloud, d = setup
    for i in range(1, 4):
        st.apply_update(cloud.update(i))
    h2 = AdapterStore(d).load(2)[1]
    if damage == "garbage CURRENT":
        (d / "CURRENT").write_text("{not json")
        expect = 3
    elif damage == "missing CURRENT":
        (d / "CURRENT").unlink()
        expect = 3
    elif damage == "missing file":
        (d / "v000003.safetensors").unlink()
        expect = 2
    else:
        raw = bytearray((d / "v000003.safetensors").read_bytes())
        raw[-5] ^= 0xFF
        (d / "v000003.safetensors").write_bytes(bytes(raw))
        expect = 2
    reopened = AdapterStore(d)
    v, state, h = reopened.current()
    assert v == expect and state_hash(state) == h
    if expect == 2:
        assert h == h2
    assert reopened.recovery_note and f"fell back to version {expect}" in reopened.recovery_note
    assert "fell back" in caplog.text
    assert json.loads((d / "CURRENT").read_text())["version"] == expect  # repaired


def test_store_with_no_loadable_version_gives_a_one_line_error_with_the_fix(setup):
    _st, _cloud, d = setup
    (d / "v000000.safetensors").write_bytes(b"junk")
    with pytest.raises(StoreError) as e:
        AdapterStore(d)
    assert "\n" not in str(e.value) and "force=True" in str(e.value)


def test_store_changed_by_another_process_is_not_overwritten(setup):
    st, cloud, d = setup
    other = AdapterStore(d)
    other.apply_update(cloud.update(1))
    rival = Cloud(make_state(0)).update(77)  # a valid 0 -> 1 for what `st` still believes
    with pytest.raises(StoreError, match="reopen"):
        st.apply_update(rival)
    assert AdapterStore(d).current()[2] == other.hash


def test_concurrent_writer_is_told_the_store_is_busy(setup):
    st, cloud, d = setup
    with store_mod.locked(d):
        with pytest.raises(StoreError, match="another process"):
            st.apply_update(cloud.update(1))


def test_a_full_disk_while_writing_a_version_changes_nothing_and_the_update_retries(setup, monkeypatch):
    import errno

    st, cloud, d = setup
    st.apply_update(cloud.update(1))
    before = (st.version, st.hash, sorted(f.name for f in d.iterdir()))
    packet = cloud.update(2)
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        st.apply_update(packet)
    monkeypatch.setattr(os, "fsync", real_fsync)
    reopened = AdapterStore(d)
    assert (reopened.version, reopened.hash, sorted(f.name for f in d.iterdir())) == before   # no temp file left
    assert reopened.apply_update(packet)["version"] == 2
