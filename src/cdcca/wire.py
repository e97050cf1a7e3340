"""The one packet codec shared by the uplink (device -> cloud) and the downlink (cloud -> device).

A packet is a plain safetensors file: an 8-byte little-endian header length, a JSON header
(tensor index plus string metadata) and the raw tensor bytes. The codec adds reserved ``cdcca.*``
metadata (format version, kind, creation time, body SHA-256). Packets cross a trust boundary, so
:func:`decode` validates every header field against :class:`Limits` and checks the hash *before*
safetensors allocates anything, and any bad input raises :class:`PacketError`. No pickle, ever.
The hash detects corruption and naive tampering; it is not a signature (anyone can recompute it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cdcca.atomic import atomic_write

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
KINDS = ("uplink", "update", "resync")

_PREFIX = "cdcca."
_K_VERSION, _K_KIND = _PREFIX + "format_version", _PREFIX + "kind"
_K_CREATED, _K_SHA = _PREFIX + "created", _PREFIX + "body_sha256"
_RESERVED = (_K_VERSION, _K_KIND, _K_CREATED, _K_SHA)
# safetensors dtype code -> (dtype name, as torch and numpy spell it, bytes per element); names, not torch
# dtypes, so that the torch-free numpy decoder (the cloud's inbox) never imports torch
_DTYPES: dict[str, tuple[str, int]] = {
    "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
    "I32": ("int32", 4), "I64": ("int64", 8), "BOOL": ("bool", 1),
}
_DTYPE_NAMES = {name for name, _ in _DTYPES.values()}


class PacketError(ValueError):
    """A packet is malformed, truncated, oversized, of the wrong version or kind, or tampered."""


NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


def is_valid_name(name: Any) -> bool:
    """Device ids and group names become directory names on the cloud, so only a plain name passes:
    a letter or digit, then letters, digits, ``_ . -``; at most 64 characters (no ``/``, no ``..``)."""
    return isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None and ".." not in name


def require_plain_name(kind: str, name: str) -> str:
    """``name`` if :func:`is_valid_name`, else a one-line ValueError saying what a plain name is."""
    if not is_valid_name(name):
        raise ValueError(f"{kind} {str(name)[:40]!r} is not a plain name (letters, digits, _ . -; at most 64 "
                         f"characters, no '..'): the cloud files devices and groups under their names")
    return name


@dataclass(frozen=True)
class Limits:
    """Upper bounds enforced by :func:`decode` before anything large is allocated."""

    max_bytes: int = 64 * 2**20
    max_header_bytes: int = 2**20
    max_tensors: int = 4096
    max_dims: int = 4
    max_elements_per_tensor: int = 2**26
    max_string: int = 4096  # per metadata key/value and per tensor name, in characters
    max_meta_keys: int = 256  # user keys; the codec's reserved keys come on top


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, eq=False)
class Packet:
    """A decoded, verified packet: torch tensors from :func:`decode`, numpy arrays from :func:`decode_arrays`
    (what a torch-free reader, the cloud's inbox, checks). ``meta`` holds only the caller's keys."""

    kind: str
    meta: dict[str, str]
    tensors: dict[str, Any]
    version: int
    created: str
    body_sha256: str
    nbytes: int | None = None  # encoded size in bytes, when known


def _short(s: Any, n: int = 60) -> str:
    r = repr(s)
    return r if len(r) <= n else r[: n - 3] + "..."


def _body_sha256(header: Mapping[str, Any], body: bytes | memoryview) -> str:
    """SHA-256 over the canonical header JSON (without the hash itself) plus the data section."""
    meta = {k: v for k, v in header["__metadata__"].items() if k != _K_SHA}
    canon = json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":"))
    h = hashlib.sha256(canon.encode("utf-8"))
    h.update(body)
    return h.hexdigest()


def _is_text(x: Any, limit: int = sys.maxsize) -> bool:
    """A str of at most ``limit`` characters that is valid UTF-8 (no lone surrogates)."""
    if not isinstance(x, str) or len(x) > limit:
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encode(kind: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None,
            *, version: int = FORMAT_VERSION, created: str | None = None) -> bytes:
    import safetensors.torch  # lazily: only encoders need torch, the numpy decoder must not pull it in
    import torch

    if kind not in KINDS:
        raise ValueError(f"unknown packet kind {_short(kind)}; expected one of {KINDS}")
    user = dict(meta or {})
    for k, v in user.items():
        if not (_is_text(k) and _is_text(v)):
            raise ValueError(f"metadata must map UTF-8 str to UTF-8 str; bad entry {_short(k)}: {_short(v)}")
        if k.startswith(_PREFIX):
            raise ValueError(f"metadata key {_short(k)} uses the reserved prefix {_PREFIX!r}")
    flat: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not _is_text(name) or name == "__metadata__":
            raise ValueError(f"tensor name {_short(name)} must be a UTF-8 str other than '__metadata__'")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensor {_short(name)} is a {type(t).__name__}, not a torch.Tensor")
        if str(t.dtype).removeprefix("torch.") not in _DTYPE_NAMES:
            raise ValueError(f"tensor {_short(name)} has dtype {t.dtype}, not allowed in packets")
        flat[name] = t.detach().cpu().contiguous().clone()  # clone: safetensors rejects shared storage
    stamp = created or datetime.now(UTC).isoformat(timespec="milliseconds")
    user.update({_K_VERSION: str(version), _K_KIND: kind, _K_CREATED: stamp.replace("+00:00", "Z")})
    raw = safetensors.torch.save(flat, metadata=user)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = memoryview(raw)[8 + n :]
    header["__metadata__"][_K_SHA] = _body_sha256(header, body)
    hjson = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(hjson)) + hjson + body


def encode(kind: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None) -> bytes:
    """Serialize tensors + str->str metadata into a packet. Raises ValueError on bad input."""
    return _encode(kind, tensors, meta)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise PacketError(f"packet header has duplicate key {_short(k)}")
        obj[k] = v
    return obj


def _reject_constant(name: str) -> Any:
    raise PacketError(f"packet header contains non-JSON constant {name}")


@dataclass(frozen=True)
class _Checked:
    data: bytes
    header: dict[str, Any]
    meta: dict[str, str]
    kind: str
    created: str
    sha: str
    body_start: int


def _check_meta(md: Any, limits: Limits) -> dict[str, str]:
    if not isinstance(md, dict):
        raise PacketError("packet header has no '__metadata__' object; this is not a cdcca packet")
    if len(md) > limits.max_meta_keys + len(_RESERVED):
        raise PacketError(f"packet has {len(md)} metadata keys, limit is {limits.max_meta_keys}")
    for k, v in md.items():
        if not (_is_text(k, limits.max_string) and _is_text(v, limits.max_string)):
            raise PacketError(f"metadata entry {_short(k)} is not a UTF-8 string of at most "
                              f"{limits.max_string} characters")
        if k.startswith(_PREFIX) and k not in _RESERVED:
            raise PacketError(f"unknown reserved metadata key {_short(k)}")
    missing = [k for k in _RESERVED if k not in md]
    if missing:
        raise PacketError(f"packet metadata lacks {', '.join(missing)}; this is not a cdcca packet")
    return md


def _check_index(header: dict[str, Any], body_len: int, limits: Limits) -> None:
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if len(entries) > limits.max_tensors:
        raise PacketError(f"packet has {len(entries)} tensors, limit is {limits.max_tensors}")
    spans = []
    for name, e in entries:
        tag = f"tensor {_short(name)}"
        if not _is_text(name, limits.max_string):
            raise PacketError(f"{tag} name is not UTF-8 of at most {limits.max_string} characters")
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise PacketError(f"{tag} entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise PacketError(f"{tag} has dtype {_short(dtype)}; allowed: {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):  # type() is: no bools
            raise PacketError(f"{tag} shape must be a list of non-negative integers")
        if len(shape) > limits.max_dims:
            raise PacketError(f"{tag} has {len(shape)} dims, limit is {limits.max_dims}")
        numel = math.prod(shape)
        if numel > limits.max_elements_per_tensor:
            raise PacketError(f"{tag} has {numel} elements, limit is {limits.max_elements_per_tensor}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise PacketError(f"{tag} data_offsets must be a list of two integers")
        if offs[1] - offs[0] != numel * _DTYPES[dtype][1] or offs[0] < 0:
            raise PacketError(f"{tag} data_offsets {offs} do not match {dtype} x {shape}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise PacketError(f"tensor {_short(name)} data starts at {begin}, expected {end} (gap or overlap)")
        end = stop
    if end != body_len:
        raise PacketError(f"tensors cover {end} data bytes but the packet carries {body_len}")


def _check(data: Any, expect_kind: str | None, limits: Limits) -> _Checked:
    """Validate everything about a packet except building tensors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PacketError(f"packet must be bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > limits.max_bytes:
        raise PacketError(f"packet is {size} bytes, limit is {limits.max_bytes}")
    data = data if isinstance(data, bytes) else memoryview(data).tobytes()
    if size < 8:
        raise PacketError(f"packet is {size} bytes, too short for a header length (8)")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > limits.max_header_bytes:
        raise PacketError(f"packet header length {n} is outside 2..{limits.max_header_bytes}")
    if 8 + n > size:
        raise PacketError(f"packet truncated: header needs {8 + n} bytes, got {size}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"),
                            object_pairs_hook=_json_object, parse_constant=_reject_constant)
    except PacketError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError are ValueErrors
        raise PacketError(f"packet header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise PacketError("packet header is not a JSON object")
    md = _check_meta(header.get("__metadata__"), limits)
    v = md[_K_VERSION]
    if v != str(FORMAT_VERSION):
        try:
            newer = int(v) > FORMAT_VERSION
        except ValueError:
            newer = False
        advice = "upgrade cdcca on this side" if newer else "re-encode it with a current cdcca"
        raise PacketError(f"packet format version {_short(v, 20)}, this cdcca reads version "
                          f"{FORMAT_VERSION}; {advice}")
    kind = md[_K_KIND]
    if kind not in KINDS:
        raise PacketError(f"unknown packet kind {_short(kind)}; expected one of {KINDS}")
    if expect_kind is not None and kind != expect_kind:
        raise PacketError(f"expected a {expect_kind!r} packet, got {kind!r}")
    try:
        datetime.fromisoformat(md[_K_CREATED])
    except ValueError:
        raise PacketError(f"packet creation time {_short(md[_K_CREATED])} is not ISO-8601") from None
    _check_index(header, size - 8 - n, limits)
    actual = _body_sha256(header, memoryview(data)[8 + n :])
    if not hmac.compare_digest(actual.encode(), md[_K_SHA].encode("utf-8", "replace")):   # bytes: any text compares
        raise PacketError("packet body SHA-256 mismatch: corrupted or tampered in transit; resend it")
    user = {k: v for k, v in md.items() if not k.startswith(_PREFIX)}
    return _Checked(data, header, user, kind, md[_K_CREATED], actual, 8 + n)


def _loaded(c: _Checked, load: Any) -> dict[str, Any]:
    """The tensors safetensors' own parser builds from checked bytes (second line of defence), each
    matching the header's index; a refusal is a PacketError."""
    try:
        loaded = load(c.data)
    except Exception as e:
        first = (str(e).splitlines() or [repr(e)])[0]
        raise PacketError(f"safetensors rejected the packet: {first}") from None
    want = {k: (_DTYPES[e["dtype"]][0], tuple(e["shape"])) for k, e in c.header.items() if k != "__metadata__"}
    got = {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in loaded.items()}
    if got != want:
        raise PacketError("safetensors returned tensors that differ from the header's index")
    return loaded


def decode(data: bytes, *, expect_kind: str | None = None, limits: Limits = DEFAULT_LIMITS) -> Packet:
    """Validate and decode a packet; raises PacketError on any problem."""
    # lazily: torch costs ~1.5 s to import, and the cloud's inbox reads packets with decode_arrays instead
    from safetensors.torch import load as load_safetensors  # safetensors bytes: no code execution, unlike pickle

    c = _check(data, expect_kind, limits)
    loaded = _loaded(c, load_safetensors)
    tensors = {k: loaded[k].clone() for k in sorted(loaded)}  # own the memory, not the input buffer
    return Packet(c.kind, c.meta, tensors, FORMAT_VERSION, c.created, c.sha, len(c.data))


def decode_arrays(data: bytes, *, expect_kind: str | None = None, limits: Limits = DEFAULT_LIMITS) -> Packet:
    """:func:`decode` with numpy arrays instead of torch tensors (the same checks, no torch import);
    numpy has no bfloat16, so a packet carrying one is refused here."""
    from safetensors.numpy import load as load_arrays  # safetensors bytes: no code execution, unlike pickle

    c = _check(data, expect_kind, limits)
    for name, e in c.header.items():
        if name != "__metadata__" and e["dtype"] == "BF16":
            raise PacketError(f"tensor {_short(name)} is bfloat16, which this numpy reader cannot hold")
    loaded = _loaded(c, load_arrays)
    arrays = {k: loaded[k] for k in sorted(loaded)}   # safetensors.numpy copies: the arrays own their memory
    return Packet(c.kind, c.meta, arrays, FORMAT_VERSION, c.created, c.sha, len(c.data))


def describe(packet_bytes: bytes) -> dict[str, Any]:
    """Validated summary of a packet for ``cdcca packet inspect``, without building tensors."""
    c = _check(packet_bytes, None, DEFAULT_LIMITS)
    tensors = []
    for name, e in c.header.items():
        if name != "__metadata__":
            lo, hi = e["data_offsets"]
            tensors.append({"name": name, "dtype": _DTYPES[e["dtype"]][0],
                            "shape": list(e["shape"]), "bytes": hi - lo})
    return {"kind": c.kind, "version": FORMAT_VERSION, "created": c.created, "meta": c.meta,
            "tensors": sorted(tensors, key=lambda t: t["name"]), "header_bytes": c.body_start,
            "total_bytes": len(c.data), "body_sha256": c.sha}


def read_packet(path: str | os.PathLike[str], **kw: Any) -> Packet:
    """Read and decode a packet file; oversized files are refused before reading."""
    limits: Limits = kw.get("limits", DEFAULT_LIMITS)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_bytes:
            raise PacketError(f"packet file {os.fspath(path)} is {size} bytes, limit is {limits.max_bytes}")
        data = f.read(limits.max_bytes + 1)
    return decode(data, **kw)


def write_packet(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a packet file atomically (temp file, fsync, rename): a crash leaves the old file or the new one."""
    atomic_write(path, data)
