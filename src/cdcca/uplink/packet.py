"""The ``uplink`` wire packet: what one device sends the cloud for a round (kept tokens in the code
the packet names — :mod:`~cdcca.uplink.codec` — plus text), and its strict decoder, since the cloud
must not trust a device's bytes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cdcca import wire
from cdcca.uplink.check import CheckedUplink, check_uplink
from cdcca.uplink.codec import (
    TokenBasis,
    decode_rows,
    default_token_basis,
    encode_rows,
    packet_code,
    parse_code,
)
from cdcca.uplink.config import MAX_GRID, PNG_SIGNATURE, TOKEN_DIM, UPLINK_FORMAT, UTSConfig
from cdcca.uplink.tokens import TokenStats, default_token_stats


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
                image_bytes: int = 0, code: str | None = None, n_tokens: int = 49) -> int:
    """Bytes one sample adds to an uplink packet (tokens, scales, positions, numbers, its text);
    ``code`` (a :func:`~cdcca.uplink.codec.parse_code` name) overrides the full-channel ``token_dtype``."""
    per_token = parse_code(code or f"full-{token_dtype}").bytes_per_token(token_dim) + position_bytes(n_tokens)
    return n_kept * per_token + 4 + 4 + 4 + text_bytes + 40 + image_bytes + (4 if image_bytes else 0)


def position_bytes(n_tokens: int) -> int:
    """Bytes of one token's grid position: uint8 up to 256 tokens an image, uint16 beyond."""
    return 1 if n_tokens <= 256 else 2


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
        if not 1 <= P <= MAX_GRID or kept.shape[1] < 1:
            raise ValueError(f"sample tokens must be (P, C) with 1 ≤ P ≤ {MAX_GRID}; got {tuple(s.tokens.shape)}")
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

    At the default code (pca256-ec) a sample costs ~1.7 KiB, so one packet holds up to ~35,000 samples
    before the wire's 64 MiB limit; send larger backlogs in several packets (``Outbox.pending(limit)``).
    """
    if not samples:
        raise ValueError("an uplink packet needs at least one sample")
    P, C, flat, positions, counts = _gather(samples)
    code, basis = packet_code(cfg, C, basis)
    tensors: dict[str, torch.Tensor] = {
        "positions": positions.to(torch.uint8 if position_bytes(P) == 1 else torch.uint16),
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
    refused unless the packet names that basis. Any inconsistency raises :class:`wire.PacketError`
    (every check is :func:`~cdcca.uplink.check.check_uplink`'s).
    """
    basis = basis or default_token_basis()      # built once on a trimmed install; the check reads only files
    checked = check_uplink(data, fill=fill, basis=basis, stats_shape=stats.shape if stats is not None else None)
    return uplink_batch(checked, stats=stats, basis=basis)


def uplink_batch(checked: CheckedUplink, *, stats: TokenStats | None = None,
                 basis: TokenBasis | None = None) -> UplinkBatch:
    """The tensors of a packet :func:`~cdcca.uplink.check.check_uplink` passed (with the same ``basis``):
    this only builds, it checks nothing again."""
    code, (N, P, C) = checked.code, checked.shape
    t = {k: torch.from_numpy(v) for k, v in checked.arrays.items() if k in ("tokens", "scales", "codes", "norms")}
    basis = (basis or default_token_basis()) if code.k else None
    rows = decode_rows(t, len(checked.positions), code, basis, checked.ec_codes)
    sample_of, positions = torch.from_numpy(checked.sample_of), torch.from_numpy(checked.positions)
    dense, keep, sent = _densify(rows, sample_of, positions, (N, P, C), checked.fill, stats)
    entries, meta, arrays = checked.entries, checked.meta, checked.arrays
    return UplinkBatch(
        tokens=dense, keep=keep, sent=sent, questions=[e["q"] for e in entries], answers=[e["a"] for e in entries],
        mc=[e["mc"] for e in entries], confidences=arrays["confidence"].tolist(),
        uncertainties=arrays["uncertainty"].tolist(), sample_ids=checked.sample_ids, device_id=meta["device_id"],
        adapter_version=meta["adapter_version"], fill=checked.fill, token_dtype=code.name.split("-")[1],
        code=code.name, images=checked.images, meta=dict(meta), nbytes=checked.nbytes)
