"""Reading DWC packets as the device does: strict decoding of ``"update"`` (no input may make it
crash or over-allocate), :func:`apply_delta`, and the ``"resync"`` packet; the cloud's builder
reuses this exact path, which is what keeps its mirror bit-identical to the device."""

from __future__ import annotations

import json
import lzma
import math
import zlib
from collections.abc import Mapping

import numpy as np
import torch

from cdcca import wire
from cdcca.adapter_state import AdapterState, state_hash
from cdcca.downlink.config import (
    _BITMASK,
    _DENSE,
    _MAX_KEYS_JSON,
    _MAX_TENSOR_ENTRIES,
    _SKIP,
    _SPARSE,
    _WIDTHS,
    COMPRESSORS,
    DWC_FORMAT,
    MAX_DECODE_ENTRIES,
    QUANTIZERS,
)
from cdcca.downlink.indices import _decode_bitmask, _decode_gaps
from cdcca.downlink.quantize import _dequantize
from cdcca.wire import Packet, PacketError

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


# --------------------------------------------------------------------------------------------
# blob codecs and meta fields


def _compress(data: bytes, codec: str) -> tuple[bytes, str]:
    """Compress with ``codec`` if that pays; returns (bytes, codec actually used)."""
    if codec == "none" or not data:
        return data, "none"
    if codec == "zlib":
        out = zlib.compress(data, 6)
    else:
        out = lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return (out, codec) if len(out) < len(data) else (data, "none")


def _decompress(data: bytes, codec: str, expected: int, what: str) -> bytes:
    """Inverse of _compress; output must be exactly ``expected`` bytes (bomb-safe)."""
    if codec == "none":
        if len(data) != expected:
            raise PacketError(f"{what}: {len(data)} bytes, expected {expected}")
        return data
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, expected)
            if not d.eof and not d.unconsumed_tail:
                out += d.flush()
            ok = d.eof and not d.unconsumed_tail and not d.unused_data
        elif codec == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            out = d.decompress(data, expected)
            if not d.eof and not d.needs_input:
                out += d.decompress(b"", 1)
            ok = d.eof and not d.unused_data
        else:
            raise PacketError(f"{what}: unknown codec {codec!r}")
    except (zlib.error, lzma.LZMAError) as e:
        raise PacketError(f"{what}: {codec} stream is corrupt ({e})") from None
    if not ok or len(out) != expected:
        raise PacketError(f"{what}: {codec} stream does not decompress to exactly {expected} bytes")
    return out


def _meta_int(meta: Mapping[str, str], key: str, lo: int, hi: int) -> int:
    s = meta.get(key)
    if s is None:
        raise PacketError(f"update packet meta lacks {key!r}")
    try:
        v = int(s)
    except ValueError:
        raise PacketError(f"update packet meta {key}={s!r} is not an integer") from None
    if not lo <= v <= hi:
        raise PacketError(f"update packet meta {key}={v} outside {lo}..{hi}")
    return v


def _meta_choice(meta: Mapping[str, str], key: str, choices: tuple[str, ...]) -> str:
    s = meta.get(key)
    if s not in choices:
        raise PacketError(f"update packet meta {key}={s!r}; expected one of {choices}")
    return s


# --------------------------------------------------------------------------------------------
# decoding (the device side)


def apply_delta(state: AdapterState, delta: AdapterState) -> AdapterState:
    """New state = state + delta (fp32 add, elementwise, deterministic; cast back to the state's
    dtype). Keys absent from ``delta`` are copied. Raises ValueError on unknown keys or shapes."""
    extra = set(delta) - set(state)
    if extra:
        raise ValueError(f"delta has keys not in the state: {sorted(extra)[:5]}")
    out: AdapterState = {}
    for k, s in state.items():
        d = delta.get(k)
        if d is None:
            out[k] = s.detach().clone().contiguous()
            continue
        if d.shape != s.shape:
            raise ValueError(f"delta {k!r} has shape {tuple(d.shape)}, state has {tuple(s.shape)}")
        r = torch.add(s.detach().float(), d.float())
        out[k] = (r if s.dtype == torch.float32 else r.to(s.dtype)).contiguous()
    return out



def _check_update_tensors(packet: Packet) -> None:
    """Kind, format, tensor names and dtypes of an ``"update"`` packet."""
    if packet.kind != "update":
        raise PacketError(f"expected an 'update' packet, got {packet.kind!r}")
    meta, tens = packet.meta, packet.tensors
    if meta.get("dwc_format") != DWC_FORMAT:
        raise PacketError(f"update packet dwc_format={meta.get('dwc_format')!r}; this cdcca reads "
                          f"{DWC_FORMAT!r} (update the device or ask the cloud for a resync)")
    expected = {"dwc::keys", "dwc::idx", "dwc::q", "dwc::scale"}
    if set(tens) != expected:
        raise PacketError(f"update packet tensors {sorted(tens)} != {sorted(expected)}")
    for name, dt in (("dwc::keys", torch.uint8), ("dwc::idx", torch.uint8), ("dwc::q", torch.uint8),
                     ("dwc::scale", torch.float16)):
        if tens[name].dtype != dt or tens[name].dim() != 1:
            raise PacketError(f"update tensor {name} must be 1-D {dt}, got {tens[name].dtype} "
                              f"{tuple(tens[name].shape)}")


def _blob(packet: Packet, name: str, limit: int) -> bytes:
    """The decompressed ``dwc::<name>`` blob; its size is bounded by what the declared adapter can
    need, so no decompression bomb."""
    codec = _meta_choice(packet.meta, f"{name}_codec", COMPRESSORS)
    n = _meta_int(packet.meta, f"{name}_nbytes", 0, limit)
    return _decompress(packet.tensors[f"dwc::{name}"].numpy().tobytes(), codec, n, f"update dwc::{name}")


def _read_keys(packet: Packet) -> tuple[list[str], list[list[int]], list[int]]:
    """(sorted adapter keys, their shapes, their entry counts) from ``dwc::keys``."""
    try:
        kj = json.loads(_blob(packet, "keys", _MAX_KEYS_JSON).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise PacketError(f"update key list is not UTF-8 JSON ({ex})") from None
    names, shapes = (kj.get("names"), kj.get("shapes")) if isinstance(kj, dict) else (None, None)
    if not (isinstance(names, list) and isinstance(shapes, list) and len(names) == len(shapes)
            and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)):
        raise PacketError("update key list must hold unique names and one shape per name")
    numels = []
    for n, sh in zip(names, shapes):
        if not (isinstance(sh, list) and all(type(d) is int and d >= 0 for d in sh)):
            raise PacketError(f"update shape of {n!r} is not a list of non-negative ints")
        numels.append(math.prod(sh))
    if sum(numels) > MAX_DECODE_ENTRIES or any(x > _MAX_TENSOR_ENTRIES for x in numels):
        raise PacketError(f"update describes {sum(numels)} entries, limit {MAX_DECODE_ENTRIES}")
    return names, shapes, numels


def _read_table(packet: Packet, K: int, total: int, nvals: int) -> tuple[bytes, np.ndarray]:
    """(the ``dwc::idx`` blob, its K x 4 table ``(mode, count, index_width, index_nbytes)``)."""
    idx = _blob(packet, "idx", 16 * K + 4 * total + 2 * K)  # table + worst-case streams (see _encode_gaps)
    if len(idx) < 16 * K:
        raise PacketError(f"update index blob ({len(idx)} bytes) is shorter than its table ({16 * K})")
    table = np.frombuffer(idx, dtype="<i4", count=4 * K).astype(np.int64).reshape(K, 4)
    if int(table[:, 1].sum()) != nvals:
        raise PacketError(f"update table counts sum to {int(table[:, 1].sum())}, meta n_values={nvals}")
    return idx, table


def _read_values(packet: Packet, quantizer: str, gs: int, e: int, nvals: int, total: int) -> torch.Tensor:
    """The fp32 stream of the ``nvals`` sent values (``gs`` per scale, scales times ``2**e``)."""
    qlen = {"int8": nvals, "int4": (nvals + 1) // 2, "nf4": (nvals + 1) // 2, "fp16": 2 * nvals}[quantizer]
    if nvals > total:
        raise PacketError(f"update sends {nvals} values for an adapter of {total} entries")
    qbytes = _blob(packet, "q", 2 * total)
    if len(qbytes) != qlen:
        raise PacketError(f"update value blob is {len(qbytes)} bytes, {quantizer} x {nvals} needs {qlen}")
    nscale = 0 if quantizer == "fp16" else -(-nvals // gs)
    scales = packet.tensors["dwc::scale"]
    if scales.numel() != nscale:
        raise PacketError(f"update has {scales.numel()} scales, expected {nscale}")
    return _dequantize(qbytes, scales, e, quantizer, gs, nvals)


def _read_positions(idx: bytes, off: int, row: tuple[int, int, int, int], numel: int,
                    name: str) -> tuple[np.ndarray, int]:
    """Positions of a sparse/bitmask entry from the index stream at ``off``, and the next offset."""
    mode, count, w, nb = row
    tag = f"update entry {name!r}"
    if not 0 < count <= numel:
        raise PacketError(f"{tag}: count {count} outside 1..{numel}")
    if mode == _SPARSE:
        if w not in _WIDTHS or nb % w or nb < count * w:
            raise PacketError(f"{tag}: bad sparse index width {w} / size {nb}")
    elif w or nb != -(-numel // 8):
        raise PacketError(f"{tag}: bitmask must be {-(-numel // 8)} bytes, got {nb}")
    if off + nb > len(idx):
        raise PacketError(f"{tag}: index stream runs past the index blob")
    buf = idx[off:off + nb]
    pos = (_decode_gaps(buf, w, count, numel, name) if mode == _SPARSE
           else _decode_bitmask(buf, count, numel, name))
    return pos, off + nb


def _scatter(names: list[str], shapes: list[list[int]], numels: list[int], idx: bytes, table: np.ndarray,
             values: torch.Tensor) -> AdapterState:
    """The dense per-key delta: each entry's sent values placed per its mode and index stream."""
    out: AdapterState = {}
    vpos, off = 0, 16 * len(names)
    for i, (name, sh, numel) in enumerate(zip(names, shapes, numels)):
        mode, count, w, nb = row = tuple(int(x) for x in table[i])
        flat = torch.zeros(numel, dtype=torch.float32)
        tag = f"update entry {name!r}"
        if mode == _SKIP:
            if count or w or nb:
                raise PacketError(f"{tag}: skip mode with count/index")
        elif mode == _DENSE:
            if count != numel or w or nb:
                raise PacketError(f"{tag}: dense mode must send all {numel} entries and no index")
            flat.copy_(values[vpos:vpos + count])
        elif mode in (_SPARSE, _BITMASK):
            pos, off = _read_positions(idx, off, row, numel, name)
            flat[torch.from_numpy(pos)] = values[vpos:vpos + count]
        else:
            raise PacketError(f"{tag}: unknown mode {mode}")
        vpos += count
        out[name] = flat.view(sh)
    if off != len(idx):
        raise PacketError(f"update index blob has {len(idx) - off} trailing bytes")
    return out


def decode_update(packet: Packet) -> AdapterState:
    """Dense fp32 delta (every key of the adapter; zeros where nothing was sent) from a decoded
    ``"update"`` packet. Raises :class:`~cdcca.wire.PacketError` on any inconsistent content."""
    _check_update_tensors(packet)
    meta = packet.meta
    quantizer = _meta_choice(meta, "quantizer", QUANTIZERS)
    gs = _meta_int(meta, "group_size", 1, 2**20)
    e = _meta_int(meta, "scale_exp", -1000, 1000)
    nvals = _meta_int(meta, "n_values", 0, MAX_DECODE_ENTRIES)
    names, shapes, numels = _read_keys(packet)
    total = sum(numels)
    idx, table = _read_table(packet, len(names), total, nvals)
    values = _read_values(packet, quantizer, gs, e, nvals, total)
    return _scatter(names, shapes, numels, idx, table, values)


def readdress_update(pkt: Packet, *, device_id: str, base_version: int, new_version: int) -> bytes:
    """A decoded update (same delta, base and result hashes) addressed to another device's versions:
    how a fleet group's one compressed update reaches each member whose mirror is that update's base."""
    meta = {**pkt.meta, "device_id": str(device_id), "base_version": str(int(base_version)),
            "new_version": str(int(new_version))}
    return wire.encode("update", pkt.tensors, meta)


# --------------------------------------------------------------------------------------------
# resync: the full state, when an update cannot bring the device back


def build_resync(state: AdapterState, *, device_id: str, version: int) -> bytes:
    """Full dense fp32 state as a ``"resync"`` packet (tensor name = adapter key); meta carries
    ``dwc_format``, ``device_id``, ``version`` and ``result_hash`` = ``state_hash`` of the fp32 state."""
    dense = {k: v.detach().float().contiguous() for k, v in state.items()}
    meta = {"dwc_format": DWC_FORMAT, "device_id": str(device_id), "version": str(int(version)),
            "result_hash": state_hash(dense)}
    return wire.encode("resync", dense, meta)


def decode_resync(packet: Packet) -> AdapterState:
    """The fp32 state carried by a ``"resync"`` packet, after checking its ``result_hash``."""
    if packet.kind != "resync":
        raise PacketError(f"expected a 'resync' packet, got {packet.kind!r}")
    if packet.meta.get("dwc_format") != DWC_FORMAT:
        raise PacketError(f"resync packet dwc_format={packet.meta.get('dwc_format')!r}, expected {DWC_FORMAT!r}")
    _meta_int(packet.meta, "version", 0, 2**62)
    state = {k: v.contiguous() for k, v in packet.tensors.items()}
    for k, v in state.items():
        if v.dtype != torch.float32:
            raise PacketError(f"resync tensor {k!r} is {v.dtype}, expected float32")
    if state_hash(state) != packet.meta.get("result_hash"):
        raise PacketError("resync state does not match its result_hash; ask the cloud to resend it")
    return state
