"""The ``uplink`` wire packet: what one device sends the cloud for a round (kept tokens in the code
the packet names — :mod:`~cdcca.uplink.codec` — plus text), and its strict decoder, since the cloud
must not trust a device's bytes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cdcca import wire
from cdcca.uplink.codec import (
    CODE_NAMES,
    TokenBasis,
    TokenCode,
    _need,
    _tensor,
    decode_rows,
    default_token_basis,
    encode_rows,
    packet_code,
    parse_code,
)
from cdcca.uplink.config import (
    FILLS,
    MAX_DENSE_ELEMENTS,
    PNG_SIGNATURE,
    READABLE_FORMATS,
    TOKEN_DIM,
    TOKEN_DTYPES,
    UPLINK_FORMAT,
    UTSConfig,
)
from cdcca.uplink.tokens import TokenStats, default_token_stats
from cdcca.wire import PacketError, is_valid_name


@dataclass
class UplinkSample:
    """One request the device wants the cloud to see. ``tokens`` (P, C) are the device's visual
    tokens; only the positions where ``keep`` is True are uploaded (None = all).

    Packed form (what the outbox returns, so kept rows never round-trip through a zero-filled grid):
    ``tokens`` (K, C) holds only the kept rows, ``positions`` (K,) their ascending grid positions and
    ``grid`` the grid size P; ``keep`` is then None."""

    sample_id: str
    tokens: torch.Tensor
    question: str
    answer: str
    confidence: float
    uncertainty: float = float("nan")
    keep: torch.Tensor | None = None
    mc: str = ""
    image_png: bytes | None = None
    positions: torch.Tensor | None = None
    grid: int = 0

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(kept rows (K, C), their grid positions (K,), grid size P), checked, in either form."""
        if self.tokens.ndim != 2:
            raise ValueError(f"sample {self.sample_id!r}: tokens must be (P, C) or (K, C), got {tuple(self.tokens.shape)}")
        if self.positions is None:
            P = self.tokens.shape[0]
            pos = _kept(self, P).nonzero().flatten()
            return self.tokens[pos], pos, P
        pos, P = torch.as_tensor(self.positions).long().reshape(-1), int(self.grid)
        if self.keep is not None or len(pos) != len(self.tokens) or not len(pos) or not 1 <= P <= 256 \
                or bool((pos < 0).any() or (pos >= P).any()) or bool((pos[1:] <= pos[:-1]).any()):
            raise ValueError(f"sample {self.sample_id!r}: packed tokens need keep=None, one ascending position "
                             f"in 0..grid-1 per row and at least one row")
        return self.tokens, pos, P


@dataclass
class UplinkBatch:
    """What the cloud gets from one uplink packet, ready for its bridge: ``bridge(tokens, keep)``."""

    tokens: torch.Tensor          # (N, P, C) float32, dropped slots filled per ``fill``
    keep: torch.Tensor            # (N, P) bool: False only where fill == "mask" dropped a slot
    sent: torch.Tensor            # (N, P) bool: positions that were actually uploaded
    questions: list[str]
    answers: list[str]
    mc: list[str]
    confidences: list[float]
    uncertainties: list[float]
    sample_ids: list[str]
    device_id: str
    adapter_version: str
    fill: str
    token_dtype: str
    code: str = "full-int8"
    images: list[bytes | None] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0

    def __len__(self) -> int:
        return len(self.sample_ids)


def _text_entry(s: UplinkSample) -> dict[str, str]:
    return {"id": s.sample_id, "q": s.question, "a": s.answer, "mc": s.mc}


def _utf8(obj) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"uplink text must be valid UTF-8 (no lone surrogates): {exc}") from None


PACKET_OVERHEAD = 2048   # bytes of header, metadata and alignment a packet adds (an upper bound)


def sample_cost(n_kept: int, token_dim: int = TOKEN_DIM, token_dtype: str = "int8", text_bytes: int = 64,
                image_bytes: int = 0, code: str | None = None) -> int:
    """Bytes one sample adds to an uplink packet (tokens, scales, positions, numbers, its text);
    ``code`` (a :func:`~cdcca.uplink.codec.parse_code` name) overrides the full-channel ``token_dtype``."""
    per_token = parse_code(code or f"full-{token_dtype}").bytes_per_token(token_dim) + 1
    return n_kept * per_token + 4 + 4 + 4 + text_bytes + 40 + image_bytes + (4 if image_bytes else 0)


def _kept(sample: UplinkSample, P: int) -> torch.Tensor:
    if sample.keep is None:
        return torch.ones(P, dtype=torch.bool)
    keep = torch.as_tensor(sample.keep).bool().reshape(-1)
    if keep.numel() != P:
        raise ValueError(f"sample {sample.sample_id!r}: keep has {keep.numel()} entries, tokens have {P}")
    if not keep.any():
        raise ValueError(f"sample {sample.sample_id!r}: keeps no token; keep at least one")
    return keep


def _gather(samples: Sequence[UplinkSample]) -> tuple[int, int, torch.Tensor, torch.Tensor, list[int]]:
    """Check the samples agree on (P, C) and have unique ids; (P, C, kept rows as float32 sample after
    sample, their grid positions, kept tokens per sample)."""
    ids = [s.sample_id for s in samples]
    if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique non-empty strings")
    rows, positions, counts, shapes = [], [], [], set()
    for s in samples:
        kept, pos, P = s.packed()
        if not 1 <= P <= 256 or kept.shape[1] < 1:
            raise ValueError(f"sample tokens must be (P, C) with 1 ≤ P ≤ 256; got {tuple(s.tokens.shape)}")
        shapes.add((P, kept.shape[1]))
        if len(shapes) > 1:
            raise ValueError(f"sample {s.sample_id!r} has tokens of grid × width {(P, kept.shape[1])}, "
                             f"the others {sorted(shapes)}; one packet holds one token shape")
        rows.append(kept.float())
        positions.append(pos)
        counts.append(len(pos))
    ((P, C),) = shapes
    flat = torch.cat(rows)
    if not torch.isfinite(flat).all():
        raise ValueError("uplink tokens must be finite")
    return P, C, flat, torch.cat(positions), counts


def _image_tensors(samples: Sequence[UplinkSample]) -> dict[str, torch.Tensor]:
    """``image_png`` (the PNG files back to back) and ``image_sizes`` (0 = a sample without one)."""
    images = [bytes(s.image_png or b"") for s in samples]
    for s, img in zip(samples, images):
        if img and not img.startswith(PNG_SIGNATURE):
            raise ValueError(f"sample {s.sample_id!r}: image_png is not a PNG file")
    blob = b"".join(images)
    return {
        "image_png": torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8),
        "image_sizes": torch.tensor([len(i) for i in images], dtype=torch.int32),
    }


def build_uplink(samples: Sequence[UplinkSample], cfg: UTSConfig, *, device_id: str, adapter_version: str,
                 basis: TokenBasis | None = None) -> bytes:
    """Pack the samples' kept tokens, coded per :func:`packet_code`, into one ``uplink`` packet.

    At the default code (pca128-int4) a sample costs ~1.9 KB, so one packet holds up to ~30,000 samples
    before the wire's 64 MiB limit; send larger backlogs in several packets (``Outbox.pending(limit)``).
    """
    if not samples:
        raise ValueError("an uplink packet needs at least one sample")
    P, C, flat, positions, counts = _gather(samples)
    code, basis = packet_code(cfg, C, basis)
    tensors: dict[str, torch.Tensor] = {
        "positions": positions.to(torch.uint8),
        "counts": torch.tensor(counts, dtype=torch.int32),
        "confidence": torch.tensor([float(s.confidence) for s in samples], dtype=torch.float32),
        "uncertainty": torch.tensor([float(s.uncertainty) for s in samples], dtype=torch.float32),
        "text": torch.frombuffer(bytearray(_utf8([_text_entry(s) for s in samples])), dtype=torch.uint8),
    }
    tensors.update(encode_rows(flat, code, basis))
    if cfg.allow_image:
        tensors.update(_image_tensors(samples))
    meta = {
        "uts.format": UPLINK_FORMAT, "device_id": str(device_id), "adapter_version": str(adapter_version),
        "n_samples": str(len(samples)), "n_tokens": str(P), "token_dim": str(C),
        "token_dtype": code.name.split("-")[1], "code": code.name, "fill": cfg.fill, "sample_scorer": cfg.sample_scorer,
        "token_scorer": cfg.token_scorer, "keep_ratio": repr(float(cfg.keep_ratio)), "direction": cfg.direction,
    }
    if basis is not None:
        meta["basis"] = basis.digest
    data = wire.encode("uplink", tensors, meta)
    if len(data) > wire.DEFAULT_LIMITS.max_bytes:
        raise ValueError(f"uplink packet would be {len(data)} bytes, over the wire limit of "
                         f"{wire.DEFAULT_LIMITS.max_bytes}; send the samples in several packets")
    return data


def _int_meta(meta: dict[str, str], key: str, lo: int, hi: int) -> int:
    raw = meta.get(key)
    _need(raw is not None, f"metadata lacks {key!r}")
    try:
        value = int(raw)
    except ValueError:
        value = None
    _need(value is not None and str(value) == raw and lo <= value <= hi, f"{key}={raw[:40]!r} must be an integer in {lo}..{hi}")
    return value


def _read_code(meta: dict[str, str], C: int, basis: TokenBasis | None) -> tuple[TokenCode, TokenBasis | None]:
    """The packet's token code (format 1: full-channel, named by token_dtype) and, for a pca code, this
    side's basis after checking the packet was coded with the very same one."""
    token_dtype = meta.get("token_dtype")
    if meta["uts.format"] == "1":
        _need("code" not in meta and "basis" not in meta, "a format-1 packet names no code or basis")
        _need(token_dtype in TOKEN_DTYPES, f"token_dtype {str(token_dtype)[:20]!r} is not one of {TOKEN_DTYPES}")
        return parse_code(f"full-{token_dtype}"), None
    try:
        code = parse_code(meta.get("code", ""))
    except ValueError:
        raise PacketError(f"uplink packet: unknown token code {meta.get('code', '')[:40]!r}; this cdcca reads "
                          f"{CODE_NAMES} (upgrade cdcca on this side)") from None
    _need(token_dtype == code.name.split("-")[1], f"token_dtype {str(token_dtype)[:20]!r} does not match code {code.name!r}")
    if not code.k:
        _need("basis" not in meta, f"code {code.name} names no basis")
        return code, None
    basis = basis or default_token_basis()
    _need(meta.get("basis") == basis.digest,
          f"coded with token basis {meta.get('basis', '')[:20]!r}, this side has {basis.digest!r}: device and cloud "
          "need the same token_basis.safetensors (the same cdcca weights)")
    _need(C == basis.dim and code.k <= basis.k,
          f"code {code.name} on {C}-channel tokens does not fit the {basis.k} × {basis.dim} basis")
    return code, basis


def _read_layout(meta: dict[str, str], t: dict[str, torch.Tensor], fill: str | None,
                 basis: TokenBasis | None) -> tuple[int, int, int, TokenCode, TokenBasis | None, str]:
    """(N, P, C, code, basis, fill) from the metadata, once the tensor set matches that layout."""
    _need(meta.get("uts.format") in READABLE_FORMATS,
          f"uts.format {meta.get('uts.format', '')[:20]!r} is not one of {READABLE_FORMATS}; upgrade cdcca on this side")
    N = _int_meta(meta, "n_samples", 1, 2**20)
    P = _int_meta(meta, "n_tokens", 1, 256)
    C = _int_meta(meta, "token_dim", 1, 2**20)
    _need(N * P * C <= MAX_DENSE_ELEMENTS, f"{N}×{P}×{C} tokens would expand beyond {MAX_DENSE_ELEMENTS} floats")
    code, basis = _read_code(meta, C, basis)
    fill = fill or meta.get("fill")
    _need(fill in FILLS, f"fill {str(fill)[:20]!r} is not one of {FILLS}")
    for key in ("device_id", "adapter_version"):
        _need(key in meta, f"metadata lacks {key!r}")
    _need(is_valid_name(meta["device_id"]), f"device_id {meta['device_id'][:40]!r} is not a plain name "
          f"(letters, digits, _ . -; at most 64 characters)")
    allowed = {"codes", "norms"} if code.k else {"tokens"}
    allowed |= {"positions", "counts", "confidence", "uncertainty", "text"}
    allowed |= {"scales"} if code.bits < 16 and not code.entropy else set()
    allowed |= {"image_png", "image_sizes"} if "image_sizes" in t else set()
    _need(set(t) == allowed, f"tensors {sorted(t)} do not match the layout {sorted(allowed)}")
    return N, P, C, code, basis, fill


def _read_tokens(t: dict[str, torch.Tensor], N: int, P: int, C: int, code: TokenCode,
                 basis: TokenBasis | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts, positions, float32 rows) of the kept tokens."""
    counts = _tensor(t, "counts", torch.int32, (N,)).long()
    _need(bool(((counts >= 1) & (counts <= P)).all()), f"every sample must carry 1..{P} tokens")
    M = int(counts.sum())
    positions = _tensor(t, "positions", torch.uint8, (M,)).long()
    return counts, positions, decode_rows(t, M, C, code, basis)


def _sample_of(counts: torch.Tensor, positions: torch.Tensor, P: int) -> torch.Tensor:
    """The sample index of every kept token, after checking positions lie on the grid and ascend."""
    _need(bool((positions < P).all()), f"a token position is ≥ n_tokens={P}")
    sample_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    if len(positions) > 1:   # within a sample, positions strictly ascending (hence distinct)
        step = positions[1:] - positions[:-1]
        same = sample_of[1:] == sample_of[:-1]
        _need(bool((step[same] > 0).all()), "positions within a sample must be strictly ascending")
    return sample_of


def _read_text(t: dict[str, torch.Tensor], N: int) -> list[dict[str, str]]:
    """The N ``{id, q, a, mc}`` entries, ids unique and non-empty."""
    try:
        entries = json.loads(bytes(t["text"].numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PacketError(f"uplink packet: text is not UTF-8 JSON ({exc})") from None
    _need(isinstance(entries, list) and len(entries) == N, f"text must be a JSON list of {N} entries")
    for e in entries:
        _need(isinstance(e, dict) and set(e) == {"id", "q", "a", "mc"} and all(isinstance(v, str) for v in e.values()),
              "each text entry must be {id, q, a, mc} strings")
    ids = [e["id"] for e in entries]
    _need(all(ids) and len(set(ids)) == N, "sample ids must be unique and non-empty")
    return entries


def _read_images(t: dict[str, torch.Tensor], N: int) -> list[bytes | None]:
    images: list[bytes | None] = [None] * N
    if "image_sizes" in t:
        sizes = _tensor(t, "image_sizes", torch.int32, (N,)).long()
        _need(bool((sizes >= 0).all()), "image sizes must be ≥ 0")
        blob = _tensor(t, "image_png", torch.uint8, (int(sizes.sum()),)).numpy().tobytes()
        off = 0
        for i, n in enumerate(sizes.tolist()):
            if n:
                images[i] = blob[off:off + n]
                _need(images[i].startswith(PNG_SIGNATURE), f"image of sample {i} is not a PNG")
            off += n
    return images


def _densify(rows: torch.Tensor, sample_of: torch.Tensor, positions: torch.Tensor, shape: tuple[int, int, int],
             fill: str, stats: TokenStats | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (N, P, C) with dropped slots filled, the bridge's keep mask, the sent mask)."""
    N, P, C = shape
    sent = torch.zeros(N, P, dtype=torch.bool)
    sent[sample_of, positions] = True
    if fill == "mean":
        stats = stats or default_token_stats()
        if stats.shape != (P, C):
            raise ValueError(f"fill='mean' needs token stats of shape {(P, C)}, got {stats.shape}")
        dense = stats.mean.expand(N, P, C).clone()
    else:
        dense = torch.zeros(N, P, C)
    dense[sample_of, positions] = rows
    keep = sent.clone() if fill == "mask" else torch.ones(N, P, dtype=torch.bool)
    return dense, keep, sent


def decode_uplink(data: bytes, *, fill: str | None = None, stats: TokenStats | None = None,
                  basis: TokenBasis | None = None) -> UplinkBatch:
    """Validate an uplink packet and rebuild dense (N, P, C) float32 tokens plus the bridge's keep mask.

    ``fill`` overrides the packet's fill mode; ``"mean"`` uses ``stats`` (default: the packaged
    source statistics). A pca-coded packet is reconstructed on ``basis`` (default: the packaged one),
    refused unless the packet names that basis. Any inconsistency raises :class:`wire.PacketError`.
    """
    pkt = wire.decode(data, expect_kind="uplink")
    meta, t = pkt.meta, pkt.tensors
    N, P, C, code, basis, fill = _read_layout(meta, t, fill, basis)
    counts, positions, rows = _read_tokens(t, N, P, C, code, basis)
    conf = _tensor(t, "confidence", torch.float32, (N,))
    unc = _tensor(t, "uncertainty", torch.float32, (N,))
    sample_of = _sample_of(counts, positions, P)
    entries = _read_text(t, N)
    images = _read_images(t, N)
    dense, keep, sent = _densify(rows, sample_of, positions, (N, P, C), fill, stats)
    return UplinkBatch(
        tokens=dense, keep=keep, sent=sent, questions=[e["q"] for e in entries], answers=[e["a"] for e in entries],
        mc=[e["mc"] for e in entries], confidences=conf.tolist(), uncertainties=unc.tolist(),
        sample_ids=[e["id"] for e in entries], device_id=meta["device_id"], adapter_version=meta["adapter_version"],
        fill=fill, token_dtype=code.name.split("-")[1], code=code.name, images=images, meta=dict(meta), nbytes=len(data))
