"""DWC downlink: compression of adapter deltas, bit-exact cloud/device agreement, packet hygiene."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdcca import wire
from cdcca.adapter_state import state_hash
from cdcca.downlink import (
    NF4_CODEBOOK,
    DWCConfig,
    UpdateStats,
    apply_delta,
    build_resync,
    build_update,
    decode_resync,
    decode_update,
    next_budget,
)
from cdcca.runtime.adapter_store import AdapterStore
from cdcca.wire import PacketError

SHAPES = {"l0.q.lora_A": (8, 512), "l0.q.lora_B": (512, 8), "l1.q.lora_A": (8, 512),
          "l1.q.lora_B": (512, 8), "l1.norm.weight": (64,), "head.bias": (16,)}


def make_state(seed: int, scale: float = 0.1, shapes=SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


def perturb(state, seed: int, scale: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) * scale for k, v in state.items()}


def device_apply(state, packet: bytes):
    return apply_delta(state, decode_update(wire.decode(packet, expect_kind="update")))


def build(base, target, residual=None, cfg=None, r=0):
    return build_update(base, target, residual, cfg or DWCConfig(), device_id="dev-1",
                        base_version=r, new_version=r + 1, round=r)


def norm(state) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in state.values()))


def diff(a, b):
    return {k: a[k] - b[k] for k in a}


# ---------------------------------------------------------------------------- bit exactness


@pytest.mark.parametrize("quantizer", ["int8", "int4", "nf4", "fp16"])
def test_twenty_rounds_keep_device_and_cloud_mirror_bit_identical(quantizer):
    cfg = DWCConfig(quantizer=quantizer, budget_bytes=6000)
    target = make_state(0)
    mirror = {k: v.clone() for k, v in target.items()}
    device = {k: v.clone() for k, v in target.items()}
    residual = None
    for r in range(20):
        target = perturb(target, 100 + r)
        packet, mirror, residual, stats = build(mirror, target, residual, cfg, r)
        device = device_apply(device, packet)
        meta = wire.decode(packet).meta
        assert state_hash(device) == state_hash(mirror) == meta["result_hash"], f"round {r}"
        assert stats.packet_bytes == len(packet) <= cfg.budget_bytes


def test_twenty_rounds_through_the_device_store_match_the_cloud_mirror(tmp_path):
    cfg = DWCConfig(budget_bytes=5000)
    target = make_state(1)
    store = AdapterStore.init(tmp_path / "dev", target, version=0, keep=3, device_id="dev-1")
    mirror, residual = {k: v.clone() for k, v in target.items()}, None
    for r in range(20):
        target = perturb(target, 200 + r)
        packet, mirror, residual, _ = build(mirror, target, residual, cfg, r)
        report = store.apply_update(packet)
        assert report["status"] == "applied" and report["version"] == r + 1
    v, state, h = AdapterStore(tmp_path / "dev").current()
    assert v == 20 and h == state_hash(state) == state_hash(mirror)


# ---------------------------------------------------------------------------- quantizers

ERROR_PER_ABSMAX = {"int8": 0.5 / 127, "int4": 0.5 / 7,
                    "nf4": float((NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max()) / 2}


@pytest.mark.parametrize("quantizer", ["int8", "int4", "nf4"])
def test_each_quantizer_round_trips_within_half_a_step_of_its_group_absmax(quantizer):
    gs = 32
    base = {"w": torch.zeros(4096)}
    g = torch.Generator().manual_seed(3)
    # magnitudes spread over 4 decades so groups have very different scales
    target = {"w": torch.randn(4096, generator=g) * torch.logspace(-5, -1, 4096)}
    cfg = DWCConfig(quantizer=quantizer, group_size=gs, budget_bytes=10**6)
    _packet, mirror, _, stats = build(base, target, cfg=cfg)
    assert stats.kept_entries == 4096 and stats.modes["dense"] == 1
    err = (mirror["w"] - target["w"]).abs().view(-1, gs)
    absmax = target["w"].abs().view(-1, gs).amax(dim=1, keepdim=True)
    bound = absmax * ERROR_PER_ABSMAX[quantizer] * (1 + 2e-3) + 1e-12  # + fp16 scale rounding
    assert bool((err <= bound).all()), float((err / bound).max())


def test_fp16_with_a_budget_covering_everything_reproduces_the_delta_to_fp16_precision():
    base = make_state(4)
    target = perturb(base, 5, scale=1e-3)
    _packet, mirror, _residual, stats = build(base, target, cfg=DWCConfig(quantizer="fp16", budget_bytes=10**6))
    assert stats.kept_entries == stats.total_entries
    for k in base:
        delta = target[k] - base[k]
        sent = mirror[k] - base[k]
        # fp16 relative precision 2**-11, plus fp32 rounding of the subtraction and the addition
        tol = delta.abs() * 2**-10 + (base[k].abs() + target[k].abs()) * 2**-22 + 1e-30
        assert bool(((sent - delta).abs() <= tol).all()), k
    assert stats.energy_kept > 1 - 1e-5


def test_tiny_deltas_do_not_underflow_thanks_to_the_shared_power_of_two_scale():
    base = {"w": torch.zeros(256)}
    target = {"w": torch.linspace(-1, 1, 256) * 1e-9}
    for q in ("int8", "fp16"):
        _, mirror, _, stats = build(base, target, cfg=DWCConfig(quantizer=q, budget_bytes=10**5))
        assert stats.energy_kept > 0.999, q
        assert torch.allclose(mirror["w"], target["w"], rtol=0.02, atol=1e-12), q


# ---------------------------------------------------------------------------- error feedback


def _drifting_rounds(error_feedback: bool, rounds: int = 20):
    g = torch.Generator().manual_seed(11)
    start = make_state(10)
    drift = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in start.items()}
    target, mirror, residual = start, dict(start), None
    cfg = DWCConfig(budget_bytes=3500, error_feedback=error_feedback)
    lost, rel = [], []
    for r in range(rounds):
        target = {k: v + drift[k] + torch.randn(v.shape, generator=g) * 0.01 for k, v in target.items()}
        _, mirror, residual, _stats = build(mirror, target, residual, cfg, r)
        gap = diff(target, mirror)  # cumulative true delta minus cumulative sent delta
        assert norm(gap) == pytest.approx(norm(residual), rel=1e-4)  # residual = undelivered mass
        lost.append(norm(gap))
        rel.append(norm(gap) / norm(diff(target, start)))
    return lost, rel


def test_error_feedback_keeps_the_undelivered_mass_bounded_and_cumulative_sent_converges():
    lost, rel = _drifting_rounds(True)
    assert lost[19] <= 1.2 * lost[9]  # plateau: bounded residual
    assert rel[19] < 0.2 and rel[19] < rel[4] / 2  # cumulative sent -> cumulative true delta


def test_without_error_feedback_the_lost_mass_accumulates():
    lost_ef, _ = _drifting_rounds(True)
    lost, rel = _drifting_rounds(False)
    assert lost[19] > 1.8 * lost[9]  # grows ~linearly with the rounds
    assert rel[19] > 0.4
    assert lost[19] > 3 * lost_ef[19]


# ---------------------------------------------------------------------------- budget, modes


@pytest.mark.parametrize("quantizer", ["int8", "int4", "nf4", "fp16"])
@pytest.mark.parametrize("budget", [2500, 8000, 30000])
@pytest.mark.parametrize("compressor", ["none", "zlib", "lzma"])
def test_whole_packet_never_exceeds_the_byte_budget(quantizer, budget, compressor):
    base = make_state(20)
    target = perturb(base, 21)
    cfg = DWCConfig(quantizer=quantizer, budget_bytes=budget, compressor=compressor)
    packet, _, _, stats = build(base, target, cfg=cfg)
    assert len(packet) <= budget  # the budget includes wire header + meta: no extra overhead
    assert stats.kept_entries > 0
    if compressor == "none" and stats.kept_entries < stats.total_entries:
        assert len(packet) > 0.9 * budget  # and it is actually spent


def test_budget_below_the_fixed_packet_overhead_is_refused_naming_the_field():
    base = make_state(22)
    with pytest.raises(ValueError, match="budget_bytes"):
        build(base, perturb(base, 23), cfg=DWCConfig(budget_bytes=300))


def test_small_tensor_with_many_significant_entries_is_sent_dense():
    base = {"big.lora_A": torch.zeros(64, 1024), "ln.bias": torch.zeros(16)}
    g = torch.Generator().manual_seed(5)
    target = {"big.lora_A": torch.randn(64, 1024, generator=g) * 1e-3, "ln.bias": torch.full((16,), 0.5)}
    packet, mirror, _, stats = build(base, target, cfg=DWCConfig(budget_bytes=4000))
    assert stats.modes == {"skip": 0, "sparse": 1, "bitmask": 0, "dense": 1}
    table = _table(wire.decode(packet))
    assert table["ln.bias"][0] == 3 and table["ln.bias"][1] == 16  # mode dense, all 16 values
    assert torch.allclose(mirror["ln.bias"], target["ln.bias"], rtol=1e-2)


def test_many_chosen_entries_switch_a_tensor_to_a_bitmask_index():
    base = {"w": torch.zeros(20000)}
    g = torch.Generator().manual_seed(6)
    target = {"w": torch.randn(20000, generator=g)}
    _packet, _, _, stats = build(base, target, cfg=DWCConfig(budget_bytes=9000, compressor="none"))
    assert stats.modes["bitmask"] == 1
    assert 20000 / 8 < stats.kept_entries < 20000 * 7 / 8


def test_per_tensor_scope_gives_every_tensor_a_share_of_the_budget():
    base = make_state(30)
    g = torch.Generator().manual_seed(31)
    target = {k: v + (1.0 if k == "l0.q.lora_A" else 1e-3) * torch.randn(v.shape, generator=g)
              for k, v in base.items()}
    _glob, _, _, gstats = build(base, target, cfg=DWCConfig(budget_bytes=3000))
    per, _, _, pstats = build(base, target, cfg=DWCConfig(budget_bytes=3000, scope="per_tensor"))
    assert gstats.modes["skip"] == len(SHAPES) - 1  # the loud tensor takes the whole global budget
    counts = {k: row[1] for k, row in _table(wire.decode(per)).items()}
    assert all(counts[k] > 0 for k in SHAPES if "lora" in k), counts  # each gets its share
    assert pstats.modes["skip"] < gstats.modes["skip"]


def test_energy_target_keeps_the_smallest_set_reaching_that_share():
    base = make_state(31)
    target = perturb(base, 32)
    for share in (0.3, 0.7):
        _, _, _, stats = build(base, target, cfg=DWCConfig(budget_bytes=None, energy=share, quantizer="fp16"))
        assert share - 1e-3 <= stats.energy_kept <= share + 0.02
    small = build(base, target, cfg=DWCConfig(budget_bytes=None, energy=0.3))[3]
    large = build(base, target, cfg=DWCConfig(budget_bytes=None, energy=0.7))[3]
    assert small.kept_entries < large.kept_entries < large.total_entries


def test_stats_report_sizes_against_the_dense_delta():
    base = make_state(33)
    _, _, _, stats = build(base, perturb(base, 34))
    n = sum(math.prod(s) for s in SHAPES.values())
    assert isinstance(stats, UpdateStats)
    assert (stats.total_entries, stats.dense_fp32_bytes, stats.dense_fp16_bytes) == (n, 4 * n, 2 * n)
    assert 0 < stats.energy_kept < 1 and sum(stats.modes.values()) == len(SHAPES)
    assert stats.encode_s > 0 and stats.residual_norm < stats.delta_norm


def test_default_config_sends_under_a_thirtieth_of_the_dense_fp16_delta_of_the_device_adapters():
    g = torch.Generator().manual_seed(35)
    shapes = {f"layers.{i}.{m}.lora_{ab}": ((16, 2048) if ab == "A" else (2048, 16))
              for i in range(35) for m in ("q_proj", "v_proj") for ab in "AB"}
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}  # 4.59M entries, as on the device
    target = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}
    packet, _, _, stats = build(base, target)
    assert stats.dense_fp16_bytes > 9e6
    assert len(packet) <= DWCConfig().budget_bytes and stats.ratio_vs_fp16 <= 1 / 30


# ---------------------------------------------------------------------------- packet contents


def _table(packet):
    names = json.loads(_blob(packet, "keys"))["names"]
    raw = _blob(packet, "idx")
    t = np.frombuffer(raw, dtype="<i4", count=4 * len(names)).reshape(-1, 4)
    return {n: tuple(int(x) for x in row) for n, row in zip(names, t)}


def _blob(packet, name):
    from cdcca.downlink.packet import _decompress
    return _decompress(packet.tensors[f"dwc::{name}"].numpy().tobytes(), packet.meta[f"{name}_codec"],
                       int(packet.meta[f"{name}_nbytes"]), name)


def test_update_packet_meta_names_device_versions_hashes_and_format():
    base = make_state(40)
    packet, mirror, _, _ = build_update(base, perturb(base, 41), None, DWCConfig(quantizer="nf4"),
                                        device_id="cam-7", base_version=4, new_version=9, round=3)
    p = wire.decode(packet, expect_kind="update")
    assert set(p.tensors) == {"dwc::keys", "dwc::idx", "dwc::q", "dwc::scale"}
    m = p.meta
    assert (m["device_id"], m["base_version"], m["new_version"], m["round"]) == ("cam-7", "4", "9", "3")
    assert m["base_hash"] == state_hash(base) and m["result_hash"] == state_hash(mirror)
    assert (m["quantizer"], m["group_size"], m["compressor"], m["dwc_format"]) == ("nf4", "64", "zlib", "1")


def test_corrupted_update_packet_raises_packet_error():
    base = make_state(42)
    packet = bytearray(build(base, perturb(base, 43))[0])
    packet[-10] ^= 0xFF
    with pytest.raises(PacketError):
        decode_update(wire.decode(bytes(packet)))
    with pytest.raises(PacketError):
        wire.decode(bytes(packet[: len(packet) // 2]))


def _reencode(p, tensors=None, meta=None) -> wire.Packet:
    """Re-sign a modified packet with a valid body hash, as a tamperer could."""
    data = wire.encode(p.kind, {**p.tensors, **(tensors or {})}, {**p.meta, **(meta or {})})
    return wire.decode(data)


def _raw_single_tensor_packet(stream: bytes, count: int, numel: int = 10, width: int = 1) -> wire.Packet:
    """An update for one tensor of ``numel`` entries in sparse mode with a hand-made index stream."""
    base = {"w": torch.zeros(numel)}
    target = {"w": torch.zeros(numel).index_fill_(0, torch.tensor([2]), 1.0)}
    good = wire.decode(build(base, target, cfg=DWCConfig(compressor="none", budget_bytes=4000))[0])
    idx = np.array([[1, count, width, len(stream)]], dtype="<i4").tobytes() + stream
    q = bytes([127]) * count
    return _reencode(good, {"dwc::idx": torch.frombuffer(bytearray(idx), dtype=torch.uint8),
                            "dwc::q": torch.frombuffer(bytearray(q), dtype=torch.uint8),
                            "dwc::scale": torch.ones(-(-count // 64), dtype=torch.float16)},
                     {"idx_nbytes": str(len(idx)), "q_nbytes": str(count), "n_values": str(count),
                      "idx_codec": "none", "q_codec": "none"})


def test_hand_made_sparse_index_decodes_to_the_intended_positions():
    delta = decode_update(_raw_single_tensor_packet(bytes([3, 4]), 2))  # gaps 3, 4 -> positions 2, 6
    assert torch.nonzero(delta["w"]).flatten().tolist() == [2, 6]
    # escapes: 255 + 5 -> position 259 in a 300-entry tensor
    delta = decode_update(_raw_single_tensor_packet(bytes([255, 5]), 1, numel=300))
    assert torch.nonzero(delta["w"]).flatten().tolist() == [259]


def test_decode_update_rejects_an_index_out_of_range():
    with pytest.raises(PacketError, match="out of range"):
        decode_update(_raw_single_tensor_packet(bytes([200]), 1))  # position 199 of 10


@pytest.mark.parametrize("stream,count,why", [
    (bytes([3, 0]), 2, "repeated position (gap 0)"),
    (bytes([3, 255]), 1, "stream ends in an escape"),
    (bytes([3, 4]), 3, "fewer positions than the table count"),
    (bytes([0]), 1, "position -1"),
])
def test_decode_update_rejects_malformed_index_streams(stream, count, why):
    with pytest.raises(PacketError):
        decode_update(_raw_single_tensor_packet(stream, count))


@pytest.mark.parametrize("mutation", [
    "unknown tensor", "missing tensor", "n_values", "scale count", "bad codec", "q length",
    "bad mode", "trailing index bytes", "int8 -128", "nan scale", "huge shape", "wrong kind",
    "corrupt zlib",
])
def test_decode_update_rejects_inconsistent_content(mutation):
    base = make_state(44)
    p = wire.decode(build(base, perturb(base, 45), cfg=DWCConfig(compressor="none"))[0])
    t, m = dict(p.tensors), dict(p.meta)
    if mutation == "unknown tensor":
        t["dwc::extra"] = torch.zeros(1)
    elif mutation == "missing tensor":
        del t["dwc::scale"]
    elif mutation == "n_values":
        m["n_values"] = str(int(m["n_values"]) + 1)
    elif mutation == "scale count":
        t["dwc::scale"] = t["dwc::scale"][:-1].clone()
    elif mutation == "bad codec":
        m["q_codec"] = "gzip"
    elif mutation == "q length":
        t["dwc::q"] = t["dwc::q"][:-1].clone()
    elif mutation == "bad mode":
        idx = bytearray(t["dwc::idx"].numpy().tobytes())
        idx[0:4] = (7).to_bytes(4, "little")
        t["dwc::idx"] = torch.frombuffer(idx, dtype=torch.uint8)
    elif mutation == "trailing index bytes":
        t["dwc::idx"] = torch.cat([t["dwc::idx"], torch.zeros(3, dtype=torch.uint8)])
        m["idx_nbytes"] = str(t["dwc::idx"].numel())
    elif mutation == "int8 -128":
        q = t["dwc::q"].clone()
        q[0] = 0x80
        t["dwc::q"] = q
    elif mutation == "nan scale":
        s = t["dwc::scale"].clone()
        s[0] = float("nan")
        t["dwc::scale"] = s
    elif mutation == "huge shape":
        kj = json.loads(t["dwc::keys"].numpy().tobytes())
        kj["shapes"][0] = [2**20, 2**20]
        raw = json.dumps(kj).encode()
        t["dwc::keys"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        m["keys_nbytes"] = str(len(raw))
    elif mutation == "corrupt zlib":
        t["dwc::q"] = torch.frombuffer(bytearray(b"x\x9c garbage"), dtype=torch.uint8)
        m["q_codec"] = "zlib"
    if mutation == "wrong kind":
        bad = wire.decode(wire.encode("uplink", t, m))
    else:
        bad = wire.decode(wire.encode("update", t, m))
    with pytest.raises(PacketError):
        decode_update(bad)


# ---------------------------------------------------------------------------- resync, apply


def test_resync_packet_carries_the_full_state_and_its_hash():
    state = make_state(50)
    p = wire.decode(build_resync(state, device_id="dev-1", version=12), expect_kind="resync")
    assert p.meta["version"] == "12" and p.meta["result_hash"] == state_hash(state)
    assert state_hash(decode_resync(p)) == state_hash(state)
    tampered = wire.decode(wire.encode("resync", {**p.tensors, "head.bias": torch.zeros(16)}, p.meta))
    with pytest.raises(PacketError, match="result_hash"):
        decode_resync(tampered)


def test_apply_delta_adds_in_fp32_and_rejects_mismatched_keys_or_shapes():
    s = {"a": torch.ones(3), "b": torch.zeros(2)}
    out = apply_delta(s, {"a": torch.full((3,), 0.5)})
    assert out["a"].tolist() == [1.5] * 3 and out["b"].tolist() == [0, 0]
    assert out["b"] is not s["b"]
    with pytest.raises(ValueError):
        apply_delta(s, {"c": torch.ones(1)})
    with pytest.raises(ValueError):
        apply_delta(s, {"a": torch.ones(4)})


def test_mismatched_base_and_target_are_refused():
    base = make_state(51)
    with pytest.raises(ValueError, match="keys"):
        build(base, {k: v for k, v in base.items() if k != "head.bias"})
    bad = dict(base)
    bad["head.bias"] = torch.full((16,), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        build(base, bad)


# ---------------------------------------------------------------------------- config, adaptivity


@pytest.mark.parametrize("kwargs,field_name", [
    ({"budget_bytes": 0}, "budget_bytes"), ({"energy": 1.5}, "energy"),
    ({"budget_bytes": None}, "budget_bytes"), ({"quantizer": "int3"}, "quantizer"),
    ({"group_size": 0}, "group_size"), ({"scope": "layer"}, "scope"),
    ({"compressor": "brotli"}, "compressor"), ({"adaptive": True, "budget_bytes": 10**7}, "budget_bytes"),
    ({"adapt_factor": 1.0}, "adapt_factor"), ({"error_feedback": 1}, "error_feedback"),
])
def test_config_validation_errors_name_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=rf"DWCConfig\.{field_name}="):
        DWCConfig(**kwargs)


def test_every_config_field_documents_itself():
    assert all(f.metadata.get("help") for f in dataclasses.fields(DWCConfig))


def test_adaptive_budget_grows_when_the_device_falls_behind_and_shrinks_when_it_keeps_up():
    cfg = DWCConfig(adaptive=True, budget_bytes=32768, budget_min_bytes=8192, budget_max_bytes=65536)
    behind = UpdateStats(0, 0, 0, 0, 0, energy_kept=0.2, modes={}, encode_s=0.0)
    caught_up = dataclasses.replace(behind, energy_kept=0.99)
    steady = dataclasses.replace(behind, energy_kept=0.8)
    assert next_budget(cfg, 32768, behind) == 40960
    assert next_budget(cfg, 32768, caught_up) == 26214
    assert next_budget(cfg, 32768, steady) == 32768
    assert next_budget(cfg, 60000, behind) == 65536 and next_budget(cfg, 9000, caught_up) == 8192
    assert next_budget(DWCConfig(), 1234, behind) == DWCConfig().budget_bytes  # not adaptive: fixed


def test_adaptive_rounds_raise_the_budget_until_the_device_keeps_up():
    cfg = DWCConfig(adaptive=True, budget_bytes=4000, budget_min_bytes=3000, budget_max_bytes=60000)
    target = make_state(60)
    mirror, residual, budgets = dict(target), None, []
    for r in range(12):
        target = perturb(target, 600 + r)
        packet, mirror, residual, stats = build(mirror, target, residual, cfg, r)
        assert len(packet) <= cfg.budget_bytes
        budgets.append(cfg.budget_bytes)
        cfg = dataclasses.replace(cfg, budget_bytes=next_budget(cfg, cfg.budget_bytes, stats))
    assert budgets[-1] > budgets[0]


# ---------------------------------------------------------------------------- property


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), quantizer=st.sampled_from(["int8", "int4", "nf4", "fp16"]),
       budget=st.integers(1500, 20000), scope=st.sampled_from(["global", "per_tensor"]),
       group=st.sampled_from([1, 7, 64, 256]), sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
       sparsity=st.floats(0, 0.99))
def test_any_adapter_round_trips_bit_identically_within_budget(seed, quantizer, budget, scope, group, sizes,
                                                               sparsity):
    g = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    target = {k: v + torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) > sparsity)
              for k, v in base.items()}
    cfg = DWCConfig(quantizer=quantizer, budget_bytes=budget, scope=scope, group_size=group)
    try:
        packet, mirror, residual, _stats = build(base, target, cfg=cfg)
    except ValueError as e:  # only a budget below the fixed overhead may be refused
        assert "budget_bytes" in str(e)
        return
    assert len(packet) <= budget
    device = device_apply(base, packet)
    assert state_hash(device) == state_hash(mirror)
    for k in base:  # residual = Δ - applied = target - mirror up to fp32 rounding
        assert torch.allclose(residual[k], target[k] - mirror[k], rtol=0, atol=1e-5)
