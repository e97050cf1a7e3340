"""The strict, torch-free check of an ``uplink`` packet: every rule :func:`~cdcca.uplink.decode_uplink`
enforces, on numpy arrays. The cloud's inbox (``cdcca cloud receive``) stores a packet once it passed
here, without importing torch; :func:`~cdcca.uplink.decode_uplink` builds its tensors only from a
:class:`CheckedUplink`. A device's bytes are untrusted: every inconsistency is a one-line
:class:`~cdcca.wire.PacketError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from cdcca import wire
from cdcca.trained_pair import active
from cdcca.uplink.codes import CODE_NAMES, TokenCode, default_basis_info, expand_ec_stream, need, parse_code
from cdcca.uplink.config import (
    FILLS,
    MAX_DENSE_ELEMENTS,
    MAX_GRID,
    PNG_SIGNATURE,
    READABLE_FORMATS,
    TOKEN_DTYPES,
)
from cdcca.wire import PacketError, is_valid_name


def default_stats_shape() -> tuple[int, int]:
    """(P, C) of the served pair's token statistics, from the file's header (no torch)."""
    return _stats_shape(active().file("token_stats.safetensors"))


@lru_cache(maxsize=4)
def _stats_shape(path: Path) -> tuple[int, int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return tuple(f.get_slice("mean").get_shape())


class Basis(Protocol):
    """What the check needs of a token basis: a :class:`~cdcca.uplink.codec.TokenBasis` or a
    :class:`~cdcca.uplink.codes.BasisInfo`."""

    digest: str

    @property
    def k(self) -> int: ...

    @property
    def dim(self) -> int: ...


@dataclass(frozen=True, eq=False)
class CheckedUplink:
    """An uplink packet that passed every check, as numpy arrays: what the inbox stores and what
    :func:`~cdcca.uplink.packet.uplink_batch` builds tensors from."""

    meta: dict[str, str]
    arrays: dict[str, np.ndarray]
    shape: tuple[int, int, int]    # (N, P, C)
    code: TokenCode
    fill: str
    positions: np.ndarray          # (M,) int64 grid position of every kept token
    sample_of: np.ndarray          # (M,) int64 sample index of every kept token
    entries: list[dict[str, str]]  # the N {id, q, a, mc} text entries
    images: list[bytes | None]
    ec_codes: bytes                # pcaK-ec: the stream's checked M·k int8 codes (component-major); else b""
    nbytes: int

    @property
    def device_id(self) -> str:
        return self.meta["device_id"]

    @property
    def sample_ids(self) -> list[str]:
        return [e["id"] for e in self.entries]


def check_uplink(data: bytes, *, fill: str | None = None, basis: Basis | None = None,
                 stats_shape: tuple[int, int] | None = None, grid: tuple[int, int] | None = None) -> CheckedUplink:
    """Check an uplink packet completely; ``fill`` overrides the packet's fill mode, ``basis`` (default:
    the packaged one, read without torch) is the one a pca-coded packet must name, ``stats_shape`` (P, C)
    of the token statistics a ``"mean"`` fill draws on (default: the packaged ones'), ``grid`` the (P, C) a cloud's
    encoder makes (a packet from a device on another encoder is refused; None: not checked)."""
    pkt = wire.decode_arrays(data, expect_kind="uplink")
    meta, t = pkt.meta, pkt.tensors
    N, P, C, code, fill = _read_layout(meta, t, fill, basis)
    need(grid is None or (P, C) == tuple(grid), f"the packet carries {P} tokens × {C} channels an image; this pair's "
         f"encoder makes {grid[0] if grid else 0} × {grid[1] if grid else 0}: device and cloud must serve the same pair (--weights)")
    if fill == "mean":      # the dropped slots get the statistics' means: they must have the packet's grid
        shape = stats_shape or default_stats_shape()
        need(tuple(shape) == (P, C), f"fill 'mean' needs token statistics of shape {(P, C)}; this side has {tuple(shape)}")
    counts = _array(t, "counts", "int32", (N,)).astype(np.int64)
    need(bool(((counts >= 1) & (counts <= P)).all()), f"every sample must carry 1..{P} tokens")
    M = int(counts.sum())
    positions = _array(t, "positions", "uint8" if P <= 256 else "uint16", (M,)).astype(np.int64)
    ec_codes = _check_rows(t, M, C, code)
    _array(t, "confidence", "float32", (N,))
    _array(t, "uncertainty", "float32", (N,))
    sample_of = _sample_of(counts, positions, P)
    entries = _read_text(t, N)
    images = _read_images(t, N)
    return CheckedUplink(dict(meta), t, (N, P, C), code, fill, positions, sample_of, entries, images, ec_codes,
                         pkt.nbytes)


def _array(t: dict[str, np.ndarray], name: str, dtype: str, shape: tuple) -> np.ndarray:
    need(name in t, f"tensor {name!r} is missing")
    x = t[name]
    need(str(x.dtype) == dtype, f"tensor {name!r} is {x.dtype}, expected {dtype}")
    need(tuple(x.shape) == shape, f"tensor {name!r} has shape {tuple(x.shape)}, expected {shape}")
    return x


def _int_meta(meta: dict[str, str], key: str, lo: int, hi: int) -> int:
    raw = meta.get(key)
    need(raw is not None, f"metadata lacks {key!r}")
    try:
        value = int(raw)
    except ValueError:
        value = None
    need(value is not None and str(value) == raw and lo <= value <= hi, f"{key}={raw[:40]!r} must be an integer in {lo}..{hi}")
    return value


def _read_code(meta: dict[str, str], C: int, basis: Basis | None) -> TokenCode:
    """The packet's token code (format 1: full-channel, named by token_dtype), after checking that a pca
    code was coded on this side's very basis."""
    token_dtype = meta.get("token_dtype")
    if meta["uts.format"] == "1":
        need("code" not in meta and "basis" not in meta, "a format-1 packet names no code or basis")
        need(token_dtype in TOKEN_DTYPES, f"token_dtype {str(token_dtype)[:20]!r} is not one of {TOKEN_DTYPES}")
        return parse_code(f"full-{token_dtype}")
    try:
        code = parse_code(meta.get("code", ""))
    except ValueError:
        raise PacketError(f"uplink packet: unknown token code {meta.get('code', '')[:40]!r}; this cdcca reads "
                          f"{CODE_NAMES} (upgrade cdcca on this side)") from None
    need(token_dtype == code.name.split("-")[1], f"token_dtype {str(token_dtype)[:20]!r} does not match code {code.name!r}")
    if not code.k:
        need("basis" not in meta, f"code {code.name} names no basis")
        return code
    basis = basis or default_basis_info()
    need(meta.get("basis") == basis.digest,
         f"coded with token basis {meta.get('basis', '')[:20]!r}, this side has {basis.digest!r}: device and cloud "
         "need the same token_basis.safetensors (the same trained pair: --weights)")
    need(C == basis.dim and code.k <= basis.k,
         f"code {code.name} on {C}-channel tokens does not fit the {basis.k} × {basis.dim} basis")
    return code


def _read_layout(meta: dict[str, str], t: dict[str, np.ndarray], fill: str | None,
                 basis: Basis | None) -> tuple[int, int, int, TokenCode, str]:
    """(N, P, C, code, fill) from the metadata, once the tensor set matches that layout."""
    need(meta.get("uts.format") in READABLE_FORMATS,
         f"uts.format {meta.get('uts.format', '')[:20]!r} is not one of {READABLE_FORMATS}; upgrade cdcca on this side")
    N = _int_meta(meta, "n_samples", 1, 2**20)
    P = _int_meta(meta, "n_tokens", 1, MAX_GRID if meta["uts.format"] >= "3" else 256)   # before 3: uint8 positions
    C = _int_meta(meta, "token_dim", 1, 2**20)
    need(N * P * C <= MAX_DENSE_ELEMENTS, f"{N}×{P}×{C} tokens would expand beyond {MAX_DENSE_ELEMENTS} floats")
    code = _read_code(meta, C, basis)
    fill = fill or meta.get("fill")
    need(fill in FILLS, f"fill {str(fill)[:20]!r} is not one of {FILLS}")
    for key in ("device_id", "adapter_version"):
        need(key in meta, f"metadata lacks {key!r}")
    need(is_valid_name(meta["device_id"]), f"device_id {meta['device_id'][:40]!r} is not a plain name "
         f"(letters, digits, _ . -; at most 64 characters)")
    allowed = {"codes", "norms"} if code.k else {"tokens"}
    allowed |= {"positions", "counts", "confidence", "uncertainty", "text"}
    allowed |= {"scales"} if code.bits < 16 and not code.entropy else set()
    allowed |= {"image_png", "image_sizes"} if "image_sizes" in t else set()
    need(set(t) == allowed, f"tensors {sorted(t)} do not match the layout {sorted(allowed)}")
    return N, P, C, code, fill


def _check_rows(t: dict[str, np.ndarray], M: int, C: int, code: TokenCode) -> bytes:
    """Check the M kept tokens' tensors for their code; returns a pcaK-ec stream's expanded codes (else b"")."""
    if code.entropy:
        need("codes" in t, "tensor 'codes' is missing")
        ec_codes = expand_ec_stream(t["codes"], M, code.k)
        _check_norms(t, M)
        return ec_codes
    if code.bits == 16:
        need(bool(np.isfinite(_array(t, "tokens", "float16", (M, C))).all()), "tokens must be finite")
        return b""
    scales = _array(t, "scales", "float16", (M,))
    need(bool(np.isfinite(scales).all() and (scales >= 0).all()), "scales must be finite and ≥ 0")
    if not code.k:
        _array(t, "tokens", "int8", (M, C))
        return b""
    if code.bits == 8:
        _array(t, "codes", "int8", (M, code.k))
    else:
        _array(t, "codes", "uint8", (M, (code.k + 1) // 2))
    _check_norms(t, M)
    return b""


def _check_norms(t: dict[str, np.ndarray], M: int) -> None:
    norms = _array(t, "norms", "float16", (M, 2))
    need(bool(np.isfinite(norms).all() and (norms[:, 1] >= 0).all()), "norms must be finite with σ ≥ 0")


def _sample_of(counts: np.ndarray, positions: np.ndarray, P: int) -> np.ndarray:
    """The sample index of every kept token, after checking positions lie on the grid and ascend."""
    need(bool((positions < P).all()), f"a token position is ≥ n_tokens={P}")
    sample_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    if len(positions) > 1:   # within a sample, positions strictly ascending (hence distinct)
        step = positions[1:] - positions[:-1]
        same = sample_of[1:] == sample_of[:-1]
        need(bool((step[same] > 0).all()), "positions within a sample must be strictly ascending")
    return sample_of


def _read_text(t: dict[str, np.ndarray], N: int) -> list[dict[str, str]]:
    """The N ``{id, q, a, mc}`` entries, ids unique and non-empty."""
    try:
        entries = json.loads(t["text"].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PacketError(f"uplink packet: text is not UTF-8 JSON ({exc})") from None
    need(isinstance(entries, list) and len(entries) == N, f"text must be a JSON list of {N} entries")
    for e in entries:
        need(isinstance(e, dict) and set(e) == {"id", "q", "a", "mc"} and all(isinstance(v, str) for v in e.values()),
             "each text entry must be {id, q, a, mc} strings")
    ids = [e["id"] for e in entries]
    need(all(ids) and len(set(ids)) == N, "sample ids must be unique and non-empty")
    return entries


def _read_images(t: dict[str, np.ndarray], N: int) -> list[bytes | None]:
    images: list[bytes | None] = [None] * N
    if "image_sizes" in t:
        sizes = _array(t, "image_sizes", "int32", (N,)).astype(np.int64)
        need(bool((sizes >= 0).all()), "image sizes must be ≥ 0")
        blob = _array(t, "image_png", "uint8", (int(sizes.sum()),)).tobytes()
        off = 0
        for i, n in enumerate(sizes.tolist()):
            if n:
                images[i] = blob[off:off + n]
                need(images[i].startswith(PNG_SIGNATURE), f"image of sample {i} is not a PNG")
            off += n
    return images
