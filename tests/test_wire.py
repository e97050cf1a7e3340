"""Tests for the packet codec: exact round-trips and PacketError for every bad input."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdcca import wire
from cdcca.wire import DEFAULT_LIMITS, FORMAT_VERSION, KINDS, Limits, Packet, PacketError

torch.set_num_threads(1)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALLOWED = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool]
SHAPES = [(), (0,), (1,), (5,), (2, 0, 3), (2, 3), (1, 2, 3, 2)]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def _same_packet(p: Packet, q: Packet) -> bool:
    return (p.kind, p.meta, p.version, p.created, p.body_sha256) == (
        q.kind, q.meta, q.version, q.created, q.body_sha256
    ) and p.tensors.keys() == q.tensors.keys() and all(_same(p.tensors[k], q.tensors[k]) for k in p.tensors)


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g, dtype=torch.int64).to(dtype)


def _split(packet: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", packet[:8])
    return json.loads(packet[8 : 8 + n]), packet[8 + n :]


def _rewrite(packet: bytes, edit: Callable[[dict[str, Any]], Any], body: bytes | None = None,
             rehash: bool = True) -> bytes:
    """Edit a packet's header JSON (and optionally body), re-hash so only the edit is wrong."""
    header, old_body = _split(packet)
    edit(header)
    body = old_body if body is None else body
    if rehash and isinstance(header.get("__metadata__"), dict):
        header["__metadata__"]["cdcca.body_sha256"] = wire._body_sha256(header, body)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


BASE_TENSORS = {"w": _sample(torch.float32, (3, 4)), "ids": _sample(torch.int64, (5,)),
                "mask": _sample(torch.bool, (2, 2)), "h": _sample(torch.bfloat16, (2,))}
BASE = wire.encode("uplink", BASE_TENSORS, {"device_id": "dev-7", "adapter_version": "3"})
BASE_PACKET = wire.decode(BASE)


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALLOWED, ids=str)
def test_every_allowed_dtype_round_trips_bit_exactly_for_all_shapes(dtype: torch.dtype) -> None:
    tensors = {f"t{i}": _sample(dtype, s, i) for i, s in enumerate(SHAPES)}
    p = wire.decode(wire.encode("update", tensors))
    assert p.tensors.keys() == tensors.keys()
    assert all(_same(p.tensors[k], tensors[k]) for k in tensors)


def test_special_float_values_round_trip_bit_exactly() -> None:
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45])
    assert _same(wire.decode(wire.encode("update", {"x": t})).tensors["x"], t)


def test_empty_tensor_dict_round_trips() -> None:
    p = wire.decode(wire.encode("resync", {}, {"reason": "drift"}))
    assert (p.kind, p.meta, p.tensors, p.version) == ("resync", {"reason": "drift"}, {}, FORMAT_VERSION)


def test_metadata_round_trips_without_reserved_keys() -> None:
    meta = {"device_id": "dév-☃", "empty": "", "json": '{"a": [1]}', "nl": "a\nb"}
    p = wire.decode(wire.encode("uplink", {}, meta))
    assert p.meta == meta
    assert p.created.endswith("Z") and len(p.body_sha256) == 64


def test_encode_accepts_non_contiguous_and_grad_tensors() -> None:
    base = torch.randn(4, 6, requires_grad=True)
    t = {"view": base.t()[1:3], "same": base, "alias": base}
    p = wire.decode(wire.encode("update", t))
    assert all(_same(p.tensors[k], v.detach()) for k, v in t.items())


def test_decoded_tensors_own_writable_memory() -> None:
    t = BASE_PACKET.tensors["w"]
    t.add_(0)  # would warn/fail on a read-only buffer
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_packet_nbytes_is_encoded_size() -> None:
    assert BASE_PACKET.nbytes == len(BASE)


@pytest.mark.parametrize("buf", [bytearray, memoryview])
def test_decode_accepts_bytearray_and_memoryview(buf: type) -> None:
    assert _same_packet(wire.decode(buf(BASE)), BASE_PACKET)


def test_packet_is_valid_safetensors() -> None:
    loaded = safetensors.torch.load(BASE)
    assert all(_same(loaded[k], BASE_TENSORS[k]) for k in BASE_TENSORS)


# --- encode-side errors -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["upload", "", "UPLINK"])
def test_encode_rejects_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError, match="unknown packet kind"):
        wire.encode(kind, {})


@pytest.mark.parametrize("meta", [{"cdcca.kind": "update"}, {"cdcca.anything": "x"}])
def test_encode_rejects_reserved_metadata_key(meta: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="reserved prefix"):
        wire.encode("uplink", {}, meta)


@pytest.mark.parametrize("meta", [{"n": 3}, {1: "x"}, {"s": "\ud800"}])
def test_encode_rejects_non_utf8_string_metadata(meta: dict[Any, Any]) -> None:
    with pytest.raises(ValueError):
        wire.encode("uplink", {}, meta)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.uint32])
def test_encode_rejects_disallowed_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        wire.encode("update", {"x": torch.zeros(2, dtype=dtype)})


@pytest.mark.parametrize("tensors", [{"x": [1.0]}, {"__metadata__": torch.zeros(1)}, {3: torch.zeros(1)}])
def test_encode_rejects_bad_tensor_entries(tensors: dict[Any, Any]) -> None:
    with pytest.raises(ValueError):
        wire.encode("update", tensors)


# --- decode-side errors -------------------------------------------------------------------------

def test_decode_checks_expected_kind() -> None:
    assert wire.decode(BASE, expect_kind="uplink").kind == "uplink"
    with pytest.raises(PacketError, match="expected a 'update' packet, got 'uplink'"):
        wire.decode(BASE, expect_kind="update")


@pytest.mark.parametrize("version", ["2", "0", "banana"])
def test_wrong_version_names_both_versions(version: str) -> None:
    bad = _rewrite(BASE, lambda h: h["__metadata__"].update({"cdcca.format_version": version}))
    with pytest.raises(PacketError, match=f"packet format version '{version}', this cdcca reads version 1"):
        wire.decode(bad)


def test_newer_version_advises_upgrade() -> None:
    future = wire._encode("update", {"x": torch.ones(1)}, None, version=FORMAT_VERSION + 1)
    with pytest.raises(PacketError, match="upgrade cdcca"):
        wire.decode(future)


def test_unknown_kind_in_packet_is_rejected() -> None:
    bad = _rewrite(BASE, lambda h: h["__metadata__"].update({"cdcca.kind": "exfiltrate"}))
    with pytest.raises(PacketError, match="unknown packet kind"):
        wire.decode(bad)


def test_tampered_tensor_bytes_are_detected() -> None:
    _header, body = _split(BASE)
    bad = BASE[: len(BASE) - len(body)] + bytes([body[0] ^ 1]) + body[1:]
    with pytest.raises(PacketError, match="SHA-256 mismatch"):
        wire.decode(bad)


@pytest.mark.parametrize("edit", [
    lambda h: h["__metadata__"].update({"device_id": "dev-8"}),
    lambda h: h["__metadata__"].update({"extra": "1"}),
    lambda h: h["__metadata__"].update({"cdcca.created": "2001-01-01T00:00:00Z"}),
    lambda h: h.update({"w2": h.pop("w")}),
    lambda h: h["w"].update({"shape": [4, 3]}),
])
def test_tampered_header_is_detected_without_rehash(edit: Callable[[dict[str, Any]], Any]) -> None:
    with pytest.raises(PacketError, match="SHA-256 mismatch"):
        wire.decode(_rewrite(BASE, edit, rehash=False))


def _offsets(h: dict[str, Any], name: str, lo: int, hi: int) -> None:
    h[name]["data_offsets"] = [lo, hi]


@pytest.mark.parametrize("edit,msg", [
    (lambda h: h["w"].update({"dtype": "F64"}), "dtype 'F64'"),
    (lambda h: h["w"].update({"dtype": 7}), "dtype 7"),
    (lambda h: h["w"].update({"shape": [3, -4]}), "non-negative"),
    (lambda h: h["w"].update({"shape": [3, True]}), "non-negative"),
    (lambda h: h["w"].update({"shape": "3x4"}), "non-negative"),
    (lambda h: h["w"].update({"shape": [1, 1, 1, 1, 12]}), "5 dims"),
    (lambda h: h["w"].update({"shape": [2**40, 2**40]}), "elements"),
    (lambda h: h["w"].update({"shape": [6, 4]}), "do not match"),
    (lambda h: h["w"].update({"extra": 1}), "exactly dtype"),
    (lambda h: h.update({"w": [1, 2]}), "exactly dtype"),
    (lambda h: h["w"].update({"data_offsets": [0]}), "two integers"),
    (lambda h: h["w"].update({"data_offsets": [0.0, 48.0]}), "two integers"),
    (lambda h: _offsets(h, "w", -48, 0), "do not match"),
    (lambda h: _offsets(h, "w", 10**6, 10**6 + 48), "gap or overlap"),
    (lambda h: _offsets(h, "ids", h["w"]["data_offsets"][0], h["w"]["data_offsets"][0] + 40), "overlap"),
    (lambda h: h.pop("mask"), "cover"),
    (lambda h: h.update({"z": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}), "gap or overlap"),
    (lambda h: h.pop("__metadata__"), "not a cdcca packet"),
    (lambda h: h.update({"__metadata__": ["x"]}), "not a cdcca packet"),
    (lambda h: h["__metadata__"].pop("cdcca.kind"), "lacks cdcca.kind"),
    (lambda h: h["__metadata__"].update({"n": 5}), "UTF-8 string"),
    (lambda h: h["__metadata__"].update({"cdcca.sneaky": "1"}), "unknown reserved"),
    (lambda h: h["__metadata__"].update({"cdcca.created": "yesterday"}), "ISO-8601"),
])
def test_structurally_bad_header_raises_precise_error(edit: Callable[[dict[str, Any]], Any], msg: str) -> None:
    with pytest.raises(PacketError, match=msg):
        wire.decode(_rewrite(BASE, edit))


@pytest.mark.parametrize("raw,msg", [
    (b"{\"a\": 1, \"a\": 2}", "duplicate key"),
    (b"{\"a\": NaN}", "non-JSON constant"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid UTF-8 JSON"),
    (b"{\"x\": " + b"9" * 5000 + b"}", "not valid UTF-8 JSON"),
])
def test_hostile_header_json_raises_packet_error(raw: bytes, msg: str) -> None:
    with pytest.raises(PacketError, match=msg):
        wire.decode(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("data,msg", [
    (b"", "too short"), (b"\x00" * 7, "too short"), (b"\x00" * 8, "header length 0"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", "header length"), (struct.pack("<Q", 100) + b"{}", "truncated"),
])
def test_short_or_lying_length_prefix_raises(data: bytes, msg: str) -> None:
    with pytest.raises(PacketError, match=msg):
        wire.decode(data)


@pytest.mark.parametrize("data", ["a string", None, 12, [1, 2]])
def test_non_bytes_input_raises_packet_error(data: Any) -> None:
    with pytest.raises(PacketError, match="must be bytes"):
        wire.decode(data)


@pytest.mark.parametrize("limits,msg", [
    (Limits(max_bytes=len(BASE) - 1), "limit is"),
    (Limits(max_header_bytes=64), "header length"),
    (Limits(max_tensors=3), "4 tensors"),
    (Limits(max_dims=1), "2 dims"),
    (Limits(max_elements_per_tensor=11), "12 elements"),
    (Limits(max_string=4), "at most 4 characters"),
    (Limits(max_meta_keys=1), "metadata keys"),
])
def test_each_limit_is_enforced(limits: Limits, msg: str) -> None:
    wire.decode(BASE, limits=Limits())  # sanity: fine with defaults
    with pytest.raises(PacketError, match=msg):
        wire.decode(BASE, limits=limits)


def test_oversized_input_is_rejected_before_parsing() -> None:
    with pytest.raises(PacketError, match=f"limit is {DEFAULT_LIMITS.max_bytes}"):
        wire.decode(bytes(DEFAULT_LIMITS.max_bytes + 1))


# --- property tests ------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
meta_strategy = st.dictionaries(names.filter(lambda s: not s.startswith("cdcca.")), st.text(max_size=30), max_size=5)


@st.composite
def tensors_strategy(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    out = {}
    for name in draw(st.lists(names, max_size=5, unique=True)):
        dtype = draw(st.sampled_from(ALLOWED))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        raw = bytearray(draw(st.binary(min_size=n, max_size=n)))
        if dtype == torch.bool:
            raw = bytearray(b & 1 for b in raw)
        out[name] = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape) if n else torch.zeros(shape, dtype=dtype)
    return out


@FUZZ
@given(kind=st.sampled_from(KINDS), tensors=tensors_strategy(), meta=meta_strategy)
def test_random_tensors_and_meta_round_trip_exactly(kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    p = wire.decode(wire.encode(kind, tensors, meta), expect_kind=kind)
    assert (p.kind, p.meta) == (kind, meta)
    assert p.tensors.keys() == tensors.keys() and all(_same(p.tensors[k], tensors[k]) for k in tensors)


@FUZZ
@given(pos=st.integers(0, len(BASE) - 1), flip=st.integers(1, 255))
def test_single_byte_mutation_raises_packet_error_or_decodes_identically(pos: int, flip: int) -> None:
    bad = bytearray(BASE)
    bad[pos] ^= flip
    try:
        p = wire.decode(bytes(bad))
    except PacketError:
        return
    assert _same_packet(p, BASE_PACKET)  # only possible for a harmless whitespace change


@pytest.mark.parametrize("flip", [0x01, 0x20, 0x80])
def test_every_header_byte_mutation_is_caught_or_harmless(flip: int) -> None:
    (n,) = struct.unpack("<Q", BASE[:8])
    for pos in range(8 + n):
        bad = bytearray(BASE)
        bad[pos] ^= flip
        try:
            p = wire.decode(bytes(bad))
        except PacketError:
            continue
        assert _same_packet(p, BASE_PACKET), pos


@FUZZ
@given(tensors=tensors_strategy(), data=st.data())
def test_any_truncation_raises_packet_error(tensors: dict[str, torch.Tensor], data: st.DataObject) -> None:
    packet = wire.encode("update", tensors)
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(PacketError):
        wire.decode(packet[:cut])


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_raise_packet_error(data: bytes) -> None:
    with pytest.raises(PacketError):
        wire.decode(data)


@FUZZ
@given(key=st.sampled_from(["cdcca.format_version", "cdcca.kind", "cdcca.created"]), value=st.text(max_size=40))
def test_random_reserved_values_raise_packet_error_or_decode(key: str, value: str) -> None:
    bad = _rewrite(BASE, lambda h: h["__metadata__"].update({key: value}))
    try:
        p = wire.decode(bad)
    except PacketError:
        return
    assert (p.kind, p.created) == (BASE_PACKET.kind if key != "cdcca.kind" else value,
                                   BASE_PACKET.created if key != "cdcca.created" else value)


@pytest.mark.parametrize("version", ["²", "١", " 2 ", "9" * 4096])
def test_odd_version_strings_raise_packet_error(version: str) -> None:
    bad = _rewrite(BASE, lambda h: h["__metadata__"].update({"cdcca.format_version": version}))
    with pytest.raises(PacketError, match="this cdcca reads version 1"):
        wire.decode(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(header=st.dictionaries(st.sampled_from(["__metadata__", "w", "x"]) | st.text(max_size=6), json_values, max_size=4),
       body=st.binary(max_size=64))
def test_random_json_headers_raise_packet_error(header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header).encode()
    with pytest.raises(PacketError):
        wire.decode(struct.pack("<Q", len(raw)) + raw + body)


@FUZZ
@given(shape=st.lists(st.integers(0, 2**62), min_size=1, max_size=4), dtype=st.sampled_from(["F32", "I64", "BOOL"]),
       data=st.data())
def test_huge_claimed_shapes_raise_before_allocation(shape: list[int], dtype: str, data: st.DataObject) -> None:
    limits = Limits(max_elements_per_tensor=2**10)
    size = {"F32": 4, "I64": 8, "BOOL": 1}[dtype]
    numel = 1
    for d in shape:
        numel *= d
    body = bytes(data.draw(st.integers(0, 64)))

    def edit(h: dict[str, Any]) -> None:
        for k in [k for k in h if k != "__metadata__"]:
            del h[k]
        h["big"] = {"dtype": dtype, "shape": shape, "data_offsets": [0, numel * size]}

    bad = _rewrite(BASE, edit, body=body)
    if numel <= limits.max_elements_per_tensor and numel * size == len(body):
        return  # a genuinely valid small packet; nothing to assert
    calls: list[Any] = []
    with pytest.MonkeyPatch.context() as mp, pytest.raises(PacketError):
        mp.setattr(safetensors.torch, "load", lambda *a: calls.append(a) or {})
        wire.decode(bad, limits=limits)
    assert not calls


# --- describe and files -------------------------------------------------------------------------

def test_describe_summarises_without_tensors() -> None:
    d = wire.describe(BASE)
    assert (d["kind"], d["version"], d["meta"]) == ("uplink", 1, {"device_id": "dev-7", "adapter_version": "3"})
    assert d["total_bytes"] == len(BASE) and d["body_sha256"] == BASE_PACKET.body_sha256
    assert {t["name"]: (t["dtype"], t["shape"], t["bytes"]) for t in d["tensors"]} == {
        "h": ("bfloat16", [2], 4), "ids": ("int64", [5], 40), "mask": ("bool", [2, 2], 4), "w": ("float32", [3, 4], 48)}
    json.dumps(d)  # CLI-printable


def test_describe_rejects_bad_packets() -> None:
    with pytest.raises(PacketError):
        wire.describe(BASE[:-1])


def test_write_then_read_packet_round_trips_and_leaves_no_temp_file(tmp_path: Any) -> None:
    path = tmp_path / "p.cdcca"
    wire.write_packet(path, b"old")
    wire.write_packet(path, BASE)
    assert path.read_bytes() == BASE and os.listdir(tmp_path) == ["p.cdcca"]
    assert _same_packet(wire.read_packet(path, expect_kind="uplink"), BASE_PACKET)


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.cdcca"
    wire.write_packet(path, BASE)

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        wire.write_packet(path, b"new")
    assert path.read_bytes() == BASE and os.listdir(tmp_path) == ["p.cdcca"]


def test_read_packet_refuses_oversized_file_before_reading(tmp_path: Any) -> None:
    path = tmp_path / "big"
    path.write_bytes(BASE)
    with pytest.raises(PacketError, match="limit is 10"):
        wire.read_packet(path, limits=Limits(max_bytes=10))



def test_inputs_the_fuzzer_once_crashed_on_are_clean_errors():
    """Regression inputs from fuzz/fuzz_decoders.py (tests/fixtures/fuzz/): e.g. a body-hash field holding
    non-ASCII text once raised TypeError from hmac.compare_digest instead of PacketError."""
    from pathlib import Path

    from cdcca import wire

    found = sorted((Path(__file__).parent / "fixtures" / "fuzz").glob("packet-*"))
    assert found
    for path in found:
        with pytest.raises(wire.PacketError):
            wire.decode(path.read_bytes())
