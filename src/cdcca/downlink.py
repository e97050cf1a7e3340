"""DWC downlink: Dynamic Weight-update Compression of adapter deltas (cloud -> device).

The cloud holds, per device, a *mirror* of the device's adapter state (``base``) and the newly
distilled state it wants the device to have (``target``). :func:`build_update` compresses the
change into one ``"update"`` packet (:mod:`cdcca.wire`), and returns the mirror the device will
hold after applying it, computed through the very code path the device runs
(``wire.decode`` -> :func:`decode_update` -> :func:`apply_delta`), so cloud mirror and device are
bit-identical (same :func:`~cdcca.adapter_state.state_hash`). This module is pure tensors: no
disk, no network (the device-side store is :mod:`cdcca.store`).

Algorithm (one round)
---------------------
1. **Delta with error feedback.** ``residual`` is the *undelivered mass*: the cloud's previous
   target minus the device's state (``prev_target = base + residual``). The vector compressed is
   ``Δ = (target - prev_target) + residual``. With ``error_feedback=True`` that is exactly
   ``target - base`` (what earlier rounds dropped is re-offered); with ``error_feedback=False``
   it is only the new increment ``target - prev_target`` and dropped mass is never re-sent, so it
   accumulates on the device. In both modes the returned residual is
   ``(target - base) - applied``, i.e. ``target - new_mirror`` up to fp32 rounding (the ledger of
   undelivered mass; with error feedback this is exactly ``Δ - applied``). Feed it back next
   round; pass ``None`` (zeros) after a resync or for the first round. (Literally adding the
   residual to ``target - base`` would count the dropped mass twice, because ``base`` is the
   device mirror, which already lags the cloud by exactly that mass.)
2. **Selection** by magnitude, globally over all tensors (``scope="global"``, one threshold) or
   per tensor (``scope="per_tensor"``, byte budget split in proportion to tensor size, energy
   target applied to each tensor's own norm). The largest entries are kept while the estimated
   packet stays within ``budget_bytes`` and/or until their squared norm reaches ``energy`` of
   ``‖Δ‖²`` (both set: the smaller set wins). The byte estimate is exact up to a few bytes:
   per value ``value bits + 2/group_size`` (fp16 scale per group) plus, per tensor, the index
   cost of the cheapest of four modes:

   ======== =========================================================================
   skip     nothing selected: 0 bytes, delta 0
   sparse   sorted flat positions as gaps (``p0+1, p1-p0, ...``, all >= 1) in uint8, uint16 or
            uint32 (little endian, cheapest chosen per tensor); a gap >= ``M = 2**bits - 1`` is
            written as ``gap // M`` escape words ``M`` followed by ``gap % M``, so a position is
            simply ``cumsum(words)[terminal] - 1``
   bitmask  ``ceil(numel/8)`` bytes of packed bits (little bit order), when many entries are
            chosen (roughly > 1/8 for int8)
   dense    every entry of the tensor, no index, when that costs no more than the above
            (small tensors such as norms/biases, or nearly all entries chosen)
   ======== =========================================================================

3. **Quantization** of the concatenated stream of sent values (tensors in sorted-name order,
   positions ascending), in groups of ``group_size`` consecutive values (groups may span tensor
   boundaries): ``int8`` symmetric (scale = absmax/127, codes -127..127), ``int4`` symmetric
   (absmax/7, codes -7..7 stored as nibbles 1..15, two per byte, low nibble first), ``nf4`` (the
   QLoRA 16-level NormalFloat codebook, scale = absmax, nibbles 0..15) or ``fp16`` (values cast,
   no scales). Scales are fp16 normalised by one packet-wide power of two ``2**scale_exp`` (in
   meta; fp16 values use the same trick) so tiny deltas do not underflow fp16; scales are rounded
   *up* so codes never clip. Groups whose scale is below ~6e-8 of the largest scale decode to 0.
4. **Entropy coding**: each byte blob is zlib/lzma(raw LZMA2)-compressed when that makes it
   smaller; the codec used per blob is recorded in meta.

Packet layout (``kind="update"``; all names/values below are exact)
-------------------------------------------------------------------
Tensors (all 1-D; the adapter key names live inside ``dwc::keys``, not in tensor names):

* ``dwc::keys``  uint8: UTF-8 JSON ``{"names": [...sorted keys...], "shapes": [[...], ...]}``
  (every key of the adapter, sent or not), possibly compressed (``keys_codec``).
* ``dwc::idx``   uint8: a table of ``K x 4`` little-endian int32 rows
  ``(mode, count, index_width, index_nbytes)`` (mode 0 skip, 1 sparse, 2 bitmask, 3 dense;
  ``count`` = values sent for that key) followed by the index streams of the sparse/bitmask keys
  in key order; possibly compressed (``idx_codec``).
* ``dwc::q``     uint8: packed codes of the value stream (int8: 1 byte/value; int4/nf4: 2 per
  byte, odd tail padded with nibble 0; fp16: 2 bytes/value little endian); ``q_codec``.
* ``dwc::scale`` float16: ``ceil(n_values/group_size)`` scales (empty for fp16).

Meta (strings): ``dwc_format`` (``"1"``), ``device_id``, ``base_version``, ``new_version``,
``base_hash`` (``state_hash(base)``), ``result_hash`` (``state_hash`` of the state after
applying), ``round``, ``quantizer``, ``group_size``, ``compressor`` (configured), ``scope``,
``error_feedback``, ``n_values``, ``scale_exp``, ``keys_codec``/``idx_codec``/``q_codec`` and
``keys_nbytes``/``idx_nbytes``/``q_nbytes`` (uncompressed sizes, bounding decompression).

Byte budget: ``budget_bytes`` bounds the *whole encoded packet* (wire header, meta and all
tensors): ``len(packet) <= budget_bytes`` always, no extra header allowance. The fixed part
(wire header + meta + key list, measured by encoding a skeleton packet, + 16 bytes/key table +
128 bytes slack) is subtracted and the rest is spent on values and indices using the raw
(uncompressed) cost model. Every candidate packet is then measured exactly (``result_hash`` has a
fixed length), and when the blobs compressed, the selection is re-fitted with the raw budget
scaled up by the room left (secant search, at most 6 packings, up to 2x the raw budget), keeping
the largest packet that fits. A budget below the fixed part raises ``ValueError``.

The resync packet (``kind="resync"``, :func:`build_resync`) carries the full fp32 state, tensor
name = adapter key, with meta ``dwc_format``, ``device_id``, ``version``, ``result_hash``.
"""

from __future__ import annotations

import json
import lzma
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from cdcca import wire
from cdcca.adapter_state import AdapterState, state_hash
from cdcca.wire import Packet, PacketError

__all__ = [
    "DWC_FORMAT", "DWCConfig", "UpdateStats", "build_update", "decode_update", "apply_delta",
    "build_resync", "decode_resync", "next_budget", "NF4_CODEBOOK",
]

DWC_FORMAT = "1"
MODES = ("skip", "sparse", "bitmask", "dense")
_SKIP, _SPARSE, _BITMASK, _DENSE = range(4)
QUANTIZERS = ("int8", "int4", "nf4", "fp16")
COMPRESSORS = ("none", "zlib", "lzma")
SCOPES = ("global", "per_tensor")
# QLoRA NormalFloat-4 codebook (Dettmers et al. 2023), ascending; index 7 is exactly 0.
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
_NF4_MID = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
_VALUE_BYTES = {"int8": 1.0, "int4": 0.5, "nf4": 0.5, "fp16": 2.0}
_QMAX = {"int8": 127.0, "int4": 7.0, "nf4": 1.0}
_WIDTHS = (1, 2, 4)
_ESC = {1: 2**8 - 1, 2: 2**16 - 1, 4: 2**32 - 1}
_NP_UINT = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
_MAX_TENSOR_ENTRIES = 2**31 - 1  # table counts are int32
MAX_DECODE_ENTRIES = 2**28  # a packet may not make the device allocate more than 1 GiB of delta
_MAX_KEYS_JSON = 16 * 2**20
_HEADER_SLACK = 128
_SAMPLE = 65536
_COMPRESS_HEADROOM = 2.0  # re-fits may spend up to this multiple of the raw payload budget
_FIT_TRIES = 6


def _u8(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class DWCConfig:
    """Knobs of the DWC downlink (validated on construction; errors name the field)."""

    budget_bytes: int | None = field(default=256 * 1024, metadata={"help": (
        "Upper bound on the whole encoded update packet in bytes (wire header and meta included). "
        "256 KiB is ~1/36 of the dense fp16 delta of the device's 4.6 M adapter entries; 128 KiB lost "
        "1.2-2.4 points of the dense update's accuracy, 512 KiB about 0.2. None: no byte bound "
        "(then `energy` must be set).")})
    energy: float | None = field(default=None, metadata={"help": (
        "Keep the smallest set of largest-magnitude entries whose squared norm reaches this share "
        "(0 < energy <= 1) of ||delta||^2. None: select by budget only. Both set: the smaller set.")})
    quantizer: Literal["int8", "int4", "nf4", "fp16"] = field(default="int8", metadata={"help": (
        "Value code: int8 symmetric absmax/127, int4 symmetric absmax/7 (packed 2/byte), nf4 QLoRA "
        "NormalFloat codebook (packed 2/byte), or fp16 passthrough (no scales).")})
    group_size: int = field(default=64, metadata={"help": (
        "Consecutive sent values sharing one fp16 scale (1..1048576). Ignored by fp16.")})
    scope: Literal["global", "per_tensor"] = field(default="global", metadata={"help": (
        "global: one magnitude threshold across all tensors; per_tensor: each tensor gets a budget "
        "share proportional to its size (and reaches `energy` of its own norm).")})
    error_feedback: bool = field(default=True, metadata={"help": (
        "Re-offer the mass dropped in earlier rounds (residual) so the device converges to the "
        "cloud state; False sends only each round's increment and dropped mass is lost.")})
    compressor: Literal["none", "zlib", "lzma"] = field(default="zlib", metadata={"help": (
        "Lossless coder applied to each packed byte blob when it makes it smaller.")})
    adaptive: bool = field(default=False, metadata={"help": (
        "Let next_budget() adapt the byte budget between rounds (see next_budget for the rule). "
        "Requires budget_bytes.")})
    budget_min_bytes: int = field(default=8 * 1024, metadata={"help": (
        "Lower clamp of the adaptive budget.")})
    budget_max_bytes: int = field(default=256 * 1024, metadata={"help": (
        "Upper clamp of the adaptive budget.")})
    adapt_grow_above: float = field(default=0.5, metadata={"help": (
        "Adaptive: grow the budget when the share of ||delta||^2 left undelivered (1 - "
        "energy_kept) exceeds this.")})
    adapt_shrink_below: float = field(default=0.05, metadata={"help": (
        "Adaptive: shrink the budget when the undelivered share is below this.")})
    adapt_factor: float = field(default=1.25, metadata={"help": (
        "Adaptive: multiplicative step (> 1) used to grow or shrink the budget.")})

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"DWCConfig.{name}={getattr(self, name)!r}: {why}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if self.budget_bytes is not None and not (is_int(self.budget_bytes) and self.budget_bytes > 0):
            raise bad("budget_bytes", "must be a positive int or None")
        if self.energy is not None and not (is_num(self.energy) and 0 < self.energy <= 1):
            raise bad("energy", "must be a number in (0, 1] or None")
        if self.budget_bytes is None and self.energy is None:
            raise bad("budget_bytes", "budget_bytes and energy are both None; set at least one")
        if self.quantizer not in QUANTIZERS:
            raise bad("quantizer", f"must be one of {QUANTIZERS}")
        if not (is_int(self.group_size) and 1 <= self.group_size <= 2**20):
            raise bad("group_size", "must be an int in 1..1048576")
        if self.scope not in SCOPES:
            raise bad("scope", f"must be one of {SCOPES}")
        if not isinstance(self.error_feedback, bool):
            raise bad("error_feedback", "must be a bool")
        if self.compressor not in COMPRESSORS:
            raise bad("compressor", f"must be one of {COMPRESSORS}")
        if not isinstance(self.adaptive, bool):
            raise bad("adaptive", "must be a bool")
        for name in ("budget_min_bytes", "budget_max_bytes"):
            if not (is_int(getattr(self, name)) and getattr(self, name) > 0):
                raise bad(name, "must be a positive int")
        if self.budget_min_bytes > self.budget_max_bytes:
            raise bad("budget_min_bytes", f"exceeds budget_max_bytes={self.budget_max_bytes}")
        for name in ("adapt_grow_above", "adapt_shrink_below"):
            if not (is_num(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                raise bad(name, "must be a number in [0, 1]")
        if self.adapt_shrink_below > self.adapt_grow_above:
            raise bad("adapt_shrink_below", f"exceeds adapt_grow_above={self.adapt_grow_above}")
        if not (is_num(self.adapt_factor) and self.adapt_factor > 1):
            raise bad("adapt_factor", "must be a number > 1")
        if self.adaptive:
            if self.budget_bytes is None:
                raise bad("adaptive", "needs budget_bytes (energy-only mode has no budget to adapt)")
            if not self.budget_min_bytes <= self.budget_bytes <= self.budget_max_bytes:
                raise bad("budget_bytes", f"must lie in [budget_min_bytes={self.budget_min_bytes}, "
                                          f"budget_max_bytes={self.budget_max_bytes}] when adaptive")


@dataclass
class UpdateStats:
    """What one :func:`build_update` call did (sizes in bytes)."""

    dense_fp32_bytes: int  # 4 * total_entries: the delta sent raw
    dense_fp16_bytes: int  # 2 * total_entries
    packet_bytes: int  # the encoded update packet, everything included
    kept_entries: int  # values sent (whole dense tensors included)
    total_entries: int
    energy_kept: float  # 1 - ||Δ - applied||² / ||Δ||² (quantization error included); 1.0 if Δ = 0
    modes: dict[str, int]  # tensors per mode: skip / sparse / bitmask / dense
    encode_s: float  # wall time of build_update
    budget_bytes: int | None = None  # the budget this round used
    payload_bytes: int = 0  # bytes of the dwc::* tensors as sent (after compression)
    delta_norm: float = 0.0  # ||Δ||
    residual_norm: float = 0.0  # ||new residual|| (undelivered mass)

    @property
    def ratio_vs_fp16(self) -> float:
        """packet_bytes / dense fp16 delta bytes (acceptance target: <= 1/50)."""
        return self.packet_bytes / max(1, self.dense_fp16_bytes)


def next_budget(cfg: DWCConfig, prev_budget: int | None, stats: UpdateStats) -> int:
    """Byte budget for the next round.

    Rule (only when ``cfg.adaptive``; otherwise ``cfg.budget_bytes`` is returned unchanged):
    with ``u = 1 - stats.energy_kept`` the share of this round's ``‖Δ‖²`` left undelivered (with
    error feedback Δ already contains all earlier leftovers, so ``u`` stays high exactly when the
    device keeps falling behind), the budget is multiplied by ``adapt_factor`` when
    ``u > adapt_grow_above``, divided by it when ``u < adapt_shrink_below`` (almost everything fits:
    save bytes), else kept, and finally rounded and clamped to
    ``[budget_min_bytes, budget_max_bytes]``. ``prev_budget=None`` starts from
    ``cfg.budget_bytes``. Use it as ``cfg = dataclasses.replace(cfg, budget_bytes=b)``.
    Raises ValueError when ``cfg.budget_bytes`` is None (energy-only mode has no byte budget).
    """
    if cfg.budget_bytes is None:
        raise ValueError("next_budget: DWCConfig.budget_bytes is None (energy-only mode has no byte budget)")
    if not cfg.adaptive:
        return cfg.budget_bytes
    b = float(cfg.budget_bytes if prev_budget is None else prev_budget)
    undelivered = 1.0 - float(stats.energy_kept)
    if undelivered > cfg.adapt_grow_above:
        b *= cfg.adapt_factor
    elif undelivered < cfg.adapt_shrink_below:
        b /= cfg.adapt_factor
    return int(min(cfg.budget_max_bytes, max(cfg.budget_min_bytes, round(b))))


# --------------------------------------------------------------------------------------------
# small helpers


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


def _check_states(base: AdapterState, target: AdapterState, residual: AdapterState | None) -> list[str]:
    keys = sorted(base)
    if set(target) != set(base):
        only_b, only_t = sorted(set(base) - set(target)), sorted(set(target) - set(base))
        raise ValueError(f"base and target have different keys (only in base: {only_b[:5]}, "
                         f"only in target: {only_t[:5]})")
    if residual is not None and set(residual) != set(base):
        raise ValueError("residual keys differ from base keys; pass the residual returned by the "
                         "previous build_update for this device, or None after a resync")
    for k in keys:
        b, t = base[k], target[k]
        if not (b.is_floating_point() and t.is_floating_point()):
            raise ValueError(f"adapter tensor {k!r} is not floating point ({b.dtype}, {t.dtype})")
        if b.shape != t.shape:
            raise ValueError(f"adapter tensor {k!r}: base shape {tuple(b.shape)} != target shape "
                             f"{tuple(t.shape)}")
        if residual is not None and residual[k].shape != b.shape:
            raise ValueError(f"residual {k!r} has shape {tuple(residual[k].shape)}, expected {tuple(b.shape)}")
        if b.numel() > _MAX_TENSOR_ENTRIES:
            raise ValueError(f"adapter tensor {k!r} has {b.numel()} entries; DWC supports < 2**31")
    return keys


# --------------------------------------------------------------------------------------------
# selection


def _topk_desc(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of the 1-D tensor ``a`` (values, flat indices), descending.

    Deterministic. For large ``a`` and small ``k`` a fixed-seed random sample picks a threshold
    that (almost always) keeps a little more than k candidates, so only those are sorted; if the
    sample misjudges, it falls back to ``torch.topk``.
    """
    n = a.numel()
    k = max(0, min(k, n))
    if k == 0:
        return a.new_empty(0), torch.empty(0, dtype=torch.int64)
    if k == n or n <= 4 * _SAMPLE or k > n // 8:
        if k == n:
            vals, idx = torch.sort(a, descending=True, stable=True)
            return vals, idx
        return torch.topk(a, k, sorted=True)
    gen = torch.Generator().manual_seed(0x5DC)
    sample = a[torch.randint(0, n, (_SAMPLE,), generator=gen)]
    want = min(_SAMPLE, int(k / n * _SAMPLE * 1.5) + 32)  # rank (descending) of the threshold
    thr = torch.kthvalue(sample, _SAMPLE - want + 1).values
    cand = torch.nonzero(a >= thr).squeeze(1)
    if cand.numel() < k:
        return torch.topk(a, k, sorted=True)
    cv = a[cand]
    if cand.numel() > 4 * k:
        vals, pos = torch.topk(cv, k, sorted=True)
    else:
        vals, pos = torch.sort(cv, descending=True, stable=True)
        vals, pos = vals[:k], pos[:k]
    return vals, cand[pos]


def _energy_topk(a: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest descending prefix of ``a`` (an |Δ|) whose squared sum reaches ``share`` of the total."""
    n = a.numel()
    total = float(torch.sum(a.double() ** 2))
    need = share * total
    if n == 0 or need <= 0:
        return a.new_empty(0), torch.empty(0, dtype=torch.int64)
    # guess k from a sample, then grow until the prefix holds enough energy
    s = a[torch.randint(0, n, (min(n, _SAMPLE),), generator=torch.Generator().manual_seed(0xE7))]
    s2 = torch.sort(s.double() ** 2, descending=True).values
    cs = torch.cumsum(s2, 0)
    frac = (int(torch.searchsorted(cs, share * float(cs[-1]))) + 1) / s.numel() if float(cs[-1]) > 0 else 1.0
    k = min(n, int(frac * n * 1.25) + 256)
    while True:
        vals, idx = _topk_desc(a, k)
        ce = torch.cumsum(vals.double() ** 2, 0)
        if k >= n or (ce.numel() and float(ce[-1]) >= need):
            m = int(torch.searchsorted(ce, torch.tensor([need], dtype=torch.float64))) + 1
            m = min(m, vals.numel())
            return vals[:m], idx[:m]
        k = min(n, 4 * k)


class _Costs:
    """Exact-up-to-rounding byte cost of sending a candidate prefix, with the best mode per tensor."""

    def __init__(self, idx_desc: np.ndarray, starts: np.ndarray, numels: np.ndarray, cv: float):
        order = np.argsort(idx_desc, kind="stable")
        self.rank = order  # rank in magnitude order of the j-th candidate in position order
        pos = idx_desc[order]
        self.pos = pos  # candidate global positions, ascending
        ends = starts + numels
        self.tid = np.searchsorted(ends, pos, side="right")
        self.local = pos - starts[self.tid]
        self.numels = numels
        self.K = len(numels)
        self.cv = cv  # bytes per sent value: code + amortised fp16 scale
        self.bitmask = np.ceil(numels / 8.0) + 0.0
        self.dense = numels * cv

    def plan(self, k: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """(total bytes, mode per tensor, best sparse width per tensor, selection mask)."""
        m = self.rank < k
        t, lp = self.tid[m], self.local[m]
        n = np.bincount(t, minlength=self.K).astype(np.float64)
        if t.size:
            g = np.empty_like(lp)
            g[0] = lp[0] + 1
            g[1:] = lp[1:] - lp[:-1]
            first = np.empty(t.size, dtype=bool)
            first[0] = True
            np.not_equal(t[1:], t[:-1], out=first[1:])
            g[first] = lp[first] + 1
        else:
            g = lp
        best = np.full(self.K, np.inf)
        width = np.zeros(self.K, dtype=np.int64)
        for w in _WIDTHS:
            if w == 4 or not t.size:  # tensors have < 2**31 entries: uint32 gaps never escape
                esc = 0.0
            else:
                esc = np.bincount(t, weights=(g // _ESC[w]).astype(np.float64), minlength=self.K)
            c = w * (n + esc)
            better = c < best
            best[better], width[better] = c[better], w
        costs = np.stack([np.zeros(self.K), best + n * self.cv, self.bitmask + n * self.cv, self.dense])
        mode = np.where(n > 0, np.argmin(costs[1:], axis=0) + 1, _SKIP)
        total = float(np.take_along_axis(costs, mode[None], 0).sum())
        return total, mode, width, m


class _Selector:
    """Chooses what to send from flat magnitudes ``a`` (one planner per scope unit).

    Candidates (the largest entries, enough for ``budget_cap`` bytes and/or the ``energy``
    share) are found once; :meth:`fit` then bisects the prefix length for any budget up to the
    cap, so the packet builder can re-fit cheaply after seeing how well the blobs compress.
    """

    def __init__(self, a: torch.Tensor, starts: np.ndarray, numels: np.ndarray,
                 budget_cap: float | None, energy: float | None, cv: float):
        self.K = len(numels)
        self.numels = numels
        self._seen: dict[int, float] = {}  # prefix length -> planned bytes, shared by all fits
        if a.numel() == 0:
            self.costs, self.nz = None, 0
            return
        if energy is not None:
            vals, idx = _energy_topk(a, energy)
            if budget_cap is not None:
                kb = int(max(0.0, budget_cap) // cv) + 1
                vals, idx = vals[:kb], idx[:kb]
        else:
            assert budget_cap is not None
            vals, idx = _topk_desc(a, int(max(0.0, budget_cap) // cv) + 1)
        self.nz = int(torch.count_nonzero(vals))  # zeros carry nothing; vals is descending
        self.costs = _Costs(idx[:self.nz].numpy().astype(np.int64, copy=False), starts, numels, cv)

    def fit(self, budget: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mode per tensor, sparse index width per tensor, ascending global positions of the
        magnitude-selected entries) for the largest candidate prefix within ``budget`` bytes.
        Dense tensors send all their entries regardless of the positions listed."""
        if self.costs is None:
            z = np.zeros(self.K, np.int64)
            return z, z.copy(), np.zeros(0, np.int64)
        costs, seen = self.costs, self._seen
        if self.nz not in seen:
            seen[self.nz] = costs.plan(self.nz)[0]
        lo = self.nz
        if budget is not None and seen[self.nz] > budget:
            # Largest k with plan(k) <= budget, to within 1/256 of k: the cost is monotone and
            # nearly linear in k, so alternate secant (interpolation) steps with bisection,
            # starting from the tightest bracket that earlier fits already evaluated.
            lo = max((k for k, c in seen.items() if c <= budget), default=0)
            hi = min(k for k, c in seen.items() if c > budget)
            c_lo, c_hi = seen.get(lo, 0.0), seen[hi]
            step = 0
            while hi - lo > max(1, hi // 256):
                if step % 2 == 0:
                    mid = lo + int((budget - c_lo) * (hi - lo) / max(c_hi - c_lo, 1e-9))
                else:
                    mid = (lo + hi) // 2
                mid = min(max(mid, lo + 1), hi - 1)
                c = seen[mid] = costs.plan(mid)[0]
                if c <= budget:
                    lo, c_lo = mid, c
                else:
                    hi, c_hi = mid, c
                step += 1
        _, mode, width, m = costs.plan(lo)
        return mode, width, costs.pos[m]


# --------------------------------------------------------------------------------------------
# index streams


def _encode_gaps(local: np.ndarray, w: int) -> bytes:
    """Sorted local positions -> escape-coded gap words of ``w`` bytes (see module doc)."""
    g = np.empty_like(local)
    g[0] = local[0] + 1
    g[1:] = local[1:] - local[:-1]
    esc = _ESC[w]
    nesc = g // esc
    out = np.full(int(g.size + nesc.sum()), esc, dtype=np.int64)
    out[np.cumsum(nesc + 1) - 1] = g % esc
    return out.astype(_NP_UINT[w]).tobytes()


def _decode_gaps(buf: bytes, w: int, count: int, numel: int, key: str) -> np.ndarray:
    words = np.frombuffer(buf, dtype=_NP_UINT[w]).astype(np.int64)
    term = words != _ESC[w]
    if int(term.sum()) != count or not term[-1]:
        raise PacketError(f"update: index stream of {key!r} does not hold exactly {count} positions")
    pos = np.cumsum(words)[term] - 1
    if pos[0] < 0 or pos[-1] >= numel or (count > 1 and not np.all(pos[1:] > pos[:-1])):
        raise PacketError(f"update: index of {key!r} out of range or not strictly increasing "
                          f"(tensor has {numel} entries)")
    return pos


def _decode_bitmask(buf: bytes, count: int, numel: int, key: str) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
    if bits[numel:].any():
        raise PacketError(f"update: bitmask of {key!r} has bits set beyond its {numel} entries")
    pos = np.flatnonzero(bits[:numel])
    if pos.size != count:
        raise PacketError(f"update: bitmask of {key!r} selects {pos.size} entries, table says {count}")
    return pos


# --------------------------------------------------------------------------------------------
# quantization


def _pow2(e: int) -> float:
    return math.ldexp(1.0, e)


def _norm_exp(mx: float) -> int:
    """Exponent e with mx / 2**e in [0.5, 1) (0 when mx is 0)."""
    return math.frexp(mx)[1] if mx > 0 else 0


def _quantize(v: torch.Tensor, quantizer: str, gs: int) -> tuple[bytes, torch.Tensor, int]:
    """Value stream -> (packed code bytes, fp16 scales, scale_exp)."""
    m = v.numel()
    if quantizer == "fp16":
        e = _norm_exp(float(v.abs().max())) if m else 0
        h = (v * _pow2(-e)).to(torch.float16)
        return h.numpy().astype("<f2").tobytes(), torch.empty(0, dtype=torch.float16), e
    ng = -(-m // gs)
    pad = ng * gs - m
    vg = torch.nn.functional.pad(v, (0, pad)).view(ng, gs) if m else v.view(0, gs)
    absmax = vg.abs().amax(dim=1) if m else v.new_empty(0)
    qmax = _QMAX[quantizer]
    raw = absmax / qmax
    e = _norm_exp(float(raw.max())) if m else 0
    s16 = (raw * _pow2(-e)).to(torch.float16)
    low = s16.float() * _pow2(e) * qmax < absmax  # rounded down: bump one ulp so codes never clip
    if bool(low.any()):
        s16 = torch.where(low, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    s = (s16.float() * _pow2(e)).unsqueeze(1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    x = torch.where(s > 0, vg / safe, torch.zeros_like(vg)).reshape(-1)[:m]
    if quantizer == "int8":
        q = torch.round(x).clamp_(-127, 127).to(torch.int8)
        return q.numpy().tobytes(), s16, e
    if quantizer == "int4":
        nib = (torch.round(x).clamp_(-7, 7) + 8).to(torch.uint8)
    else:  # nf4
        nib = torch.bucketize(x.clamp(-1, 1), _NF4_MID).to(torch.uint8)
    if m % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    packed = nib[0::2] | (nib[1::2] << 4)
    return packed.numpy().tobytes(), s16, e


def _dequantize(qbytes: bytes, scales: torch.Tensor, e: int, quantizer: str, gs: int, m: int) -> torch.Tensor:
    """Packed codes -> fp32 value stream (validates codes and scales)."""
    if quantizer == "fp16":
        h = torch.from_numpy(np.frombuffer(qbytes, dtype="<f2").astype(np.float16))
        if not bool(torch.isfinite(h).all()):
            raise PacketError("update: fp16 values contain inf/NaN")
        return h.float() * _pow2(e)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise PacketError("update: scales must be finite and non-negative")
    raw = torch.from_numpy(np.frombuffer(qbytes, dtype=np.uint8).copy())
    if quantizer == "int8":
        q = raw.view(torch.int8)
        if bool((q == -128).any()):
            raise PacketError("update: int8 code -128 is not produced by DWC")
        x = q.float()
    else:
        nib = torch.stack([raw & 0xF, raw >> 4], dim=1).reshape(-1)
        if nib.numel() > m and int(nib[m]) != 0:
            raise PacketError("update: padding nibble is not 0")
        nib = nib[:m]
        if quantizer == "int4":
            if bool((nib == 0).any()):
                raise PacketError("update: int4 nibble 0 is not produced by DWC")
            x = nib.float() - 8
        else:
            x = NF4_CODEBOOK[nib.long()]
    s = (scales.float() * _pow2(e)).repeat_interleave(gs)[:m]
    return x * s


# --------------------------------------------------------------------------------------------
# public API


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


def decode_update(packet: Packet) -> AdapterState:
    """Dense fp32 delta (every key of the adapter; zeros where nothing was sent) from a decoded
    ``"update"`` packet. Raises :class:`~cdcca.wire.PacketError` on any inconsistent content."""
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
    quantizer = _meta_choice(meta, "quantizer", QUANTIZERS)
    gs = _meta_int(meta, "group_size", 1, 2**20)
    e = _meta_int(meta, "scale_exp", -1000, 1000)
    nvals = _meta_int(meta, "n_values", 0, MAX_DECODE_ENTRIES)

    def blob(name: str, limit: int) -> bytes:
        # sizes are bounded by what the declared adapter can need, so no decompression bomb
        codec = _meta_choice(meta, f"{name}_codec", COMPRESSORS)
        n = _meta_int(meta, f"{name}_nbytes", 0, limit)
        return _decompress(tens[f"dwc::{name}"].numpy().tobytes(), codec, n, f"update dwc::{name}")

    try:
        kj = json.loads(blob("keys", _MAX_KEYS_JSON).decode("utf-8"))
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
    K = len(names)
    total = sum(numels)

    idx = blob("idx", 16 * K + 4 * total + 2 * K)  # table + worst-case streams (see _encode_gaps)
    if len(idx) < 16 * K:
        raise PacketError(f"update index blob ({len(idx)} bytes) is shorter than its table ({16 * K})")
    table = np.frombuffer(idx, dtype="<i4", count=4 * K).astype(np.int64).reshape(K, 4)
    off = 16 * K
    if int(table[:, 1].sum()) != nvals:
        raise PacketError(f"update table counts sum to {int(table[:, 1].sum())}, meta n_values={nvals}")
    qlen = {"int8": nvals, "int4": (nvals + 1) // 2, "nf4": (nvals + 1) // 2, "fp16": 2 * nvals}[quantizer]
    if nvals > total:
        raise PacketError(f"update sends {nvals} values for an adapter of {total} entries")
    qbytes = blob("q", 2 * total)
    if len(qbytes) != qlen:
        raise PacketError(f"update value blob is {len(qbytes)} bytes, {quantizer} x {nvals} needs {qlen}")
    nscale = 0 if quantizer == "fp16" else -(-nvals // gs)
    if tens["dwc::scale"].numel() != nscale:
        raise PacketError(f"update has {tens['dwc::scale'].numel()} scales, expected {nscale}")
    values = _dequantize(qbytes, tens["dwc::scale"], e, quantizer, gs, nvals)

    out: AdapterState = {}
    vpos = 0
    for i, (name, sh, numel) in enumerate(zip(names, shapes, numels)):
        mode, count, w, nb = (int(x) for x in table[i])
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
            off += nb
            pos = (_decode_gaps(buf, w, count, numel, name) if mode == _SPARSE
                   else _decode_bitmask(buf, count, numel, name))
            flat[torch.from_numpy(pos)] = values[vpos:vpos + count]
        else:
            raise PacketError(f"{tag}: unknown mode {mode}")
        vpos += count
        out[name] = flat.view(sh)
    if off != len(idx):
        raise PacketError(f"update index blob has {len(idx) - off} trailing bytes")
    return out


def build_update(base: AdapterState, target: AdapterState, residual: AdapterState | None,
                 cfg: DWCConfig, *, device_id: str, base_version: int, new_version: int,
                 round: int = 0) -> tuple[bytes, AdapterState, AdapterState, UpdateStats]:
    """Compress ``target - base`` (+ error feedback, see module doc) into an ``"update"`` packet.

    Returns ``(packet_bytes, new_mirror, new_residual, stats)`` where
    ``new_mirror = apply_delta(base, decode_update(wire.decode(packet)))`` (exactly what the device
    will hold; its hash is the packet's ``result_hash``) and
    ``new_residual = (target - base) - applied`` per key (fp32; = ``target - new_mirror`` up to
    rounding). ``base`` must be the device's current state (the cloud's mirror of it).
    Raises ValueError on mismatched states, inf/NaN, or a budget below the fixed overhead.
    """
    t0 = time.perf_counter()
    if not isinstance(cfg, DWCConfig):
        raise TypeError(f"cfg must be a DWCConfig, got {type(cfg).__name__}")
    keys = _check_states(base, target, residual)
    K = len(keys)
    numels = np.array([base[k].numel() for k in keys], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(numels)[:-1]]).astype(np.int64) if K else numels
    N = int(numels.sum())

    # Δ as one flat fp32 vector (tensors in sorted-key order); full = target - base
    full = torch.empty(N, dtype=torch.float32)
    for k, s, n in zip(keys, starts, numels):
        torch.sub(target[k].detach().float().reshape(-1), base[k].detach().float().reshape(-1),
                  out=full[s:s + n])
    if cfg.error_feedback or residual is None:
        delta = full
    else:  # increment only: target - prev_target, prev_target = base + residual
        delta = full - torch.cat([residual[k].detach().float().reshape(-1) for k in keys]) if K else full

    base_hash = state_hash(base)
    meta: dict[str, str] = {
        "dwc_format": DWC_FORMAT, "device_id": str(device_id), "base_version": str(int(base_version)),
        "new_version": str(int(new_version)), "base_hash": base_hash, "round": str(int(round)),
        "quantizer": cfg.quantizer, "group_size": str(cfg.group_size), "compressor": cfg.compressor,
        "scope": cfg.scope, "error_feedback": str(cfg.error_feedback).lower(),
    }
    keys_json = json.dumps({"names": keys, "shapes": [list(base[k].shape) for k in keys]},
                           separators=(",", ":")).encode("utf-8")
    keys_blob, keys_codec = _compress(keys_json, cfg.compressor)

    cv = _VALUE_BYTES[cfg.quantizer] + (0.0 if cfg.quantizer == "fp16" else 2.0 / cfg.group_size)
    size_meta = {**meta, "result_hash": "0" * 64}  # same length as the real hash
    payload_budget = None
    overhead = 0
    if cfg.budget_bytes is not None:
        skeleton = wire.encode("update", {
            "dwc::keys": _u8(keys_blob), "dwc::idx": _u8(b""), "dwc::q": _u8(b""),
            "dwc::scale": torch.empty(0, dtype=torch.float16)},
            {**size_meta, "n_values": "0" * 10, "scale_exp": "-0000", "keys_codec": "none",
             "idx_codec": "none", "q_codec": "none", "keys_nbytes": "0" * 10,
             "idx_nbytes": "0" * 10, "q_nbytes": "0" * 10})
        overhead = len(skeleton)
        fixed = overhead + _HEADER_SLACK + 16 * K + 2 + 1  # + table, scale/nibble rounding
        if fixed > cfg.budget_bytes:
            raise ValueError(f"DWCConfig.budget_bytes={cfg.budget_bytes} is below the fixed packet "
                             f"overhead ({fixed} bytes) for this {K}-tensor adapter; raise it")
        payload_budget = float(cfg.budget_bytes - fixed)

    # selection: planners find candidates once (with headroom for compression gains), then fit
    a = delta.abs()
    if N and not math.isfinite(float(a.max())):  # max propagates NaN
        raise ValueError("the delta (target - base, residual) contains inf/NaN; refusing to build an update")
    headroom = _COMPRESS_HEADROOM if cfg.compressor != "none" else 1.0
    cap = None if payload_budget is None else payload_budget * headroom
    if cfg.scope == "global" or K <= 1:
        units = [(0, 1.0, _Selector(a, starts, numels, cap, cfg.energy, cv))]
    else:
        units = [(int(s), n / N, _Selector(a[s:s + n], np.zeros(1, np.int64), np.array([n]),
                                           None if cap is None else cap * n / N, cfg.energy, cv))
                 for s, n in zip(starts, numels)]

    def fit(scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [u.fit(None if payload_budget is None else payload_budget * scale * share)
                 for _, share, u in units]
        if len(parts) == 1:
            return parts[0]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] + off for (off, _, _), p in zip(units, parts)]))

    def pack(plan: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
        modes, widths, sel = plan
        sel_tid = np.searchsorted(starts + numels, sel, side="right")
        bounds = np.searchsorted(sel_tid, np.arange(K + 1), side="left")
        table = np.zeros((K, 4), dtype=np.int64)
        streams: list[bytes] = []
        send: list[np.ndarray] = []
        for i in range(K):
            mode = int(modes[i])
            if mode == _SKIP:
                continue
            s, n = int(starts[i]), int(numels[i])
            if mode == _DENSE:
                table[i] = (mode, n, 0, 0)
                send.append(np.arange(s, s + n, dtype=np.int64))
                continue
            g = sel[bounds[i]:bounds[i + 1]]
            local = g - s
            if mode == _SPARSE:
                w = int(widths[i])
                st = _encode_gaps(local, w)
            else:
                w = 0
                mask = np.zeros(n, dtype=bool)
                mask[local] = True
                st = np.packbits(mask, bitorder="little").tobytes()
            table[i] = (mode, g.size, w, len(st))
            streams.append(st)
            send.append(g)
        allpos = np.concatenate(send) if send else np.zeros(0, np.int64)
        qbytes, scales, e = _quantize(delta[torch.from_numpy(allpos)], cfg.quantizer, cfg.group_size)
        idx_raw = table.astype("<i4").tobytes() + b"".join(streams)
        idx_blob, idx_codec = _compress(idx_raw, cfg.compressor)
        q_blob, q_codec = _compress(qbytes, cfg.compressor)
        tensors = {"dwc::keys": _u8(keys_blob), "dwc::idx": _u8(idx_blob), "dwc::q": _u8(q_blob),
                   "dwc::scale": scales}
        pmeta = {"n_values": str(int(allpos.size)), "scale_exp": str(e), "keys_codec": keys_codec,
                 "idx_codec": idx_codec, "q_codec": q_codec, "keys_nbytes": str(len(keys_json)),
                 "idx_nbytes": str(len(idx_raw)), "q_nbytes": str(len(qbytes))}
        return tensors, pmeta, int(allpos.size)

    # Fit, pack and measure the real packet size (exact: result_hash has a fixed length); when the
    # blobs compressed well, re-fit with the budget scaled up by the room left (a few tries).
    best: tuple[dict[str, torch.Tensor], dict[str, str], int, np.ndarray] | None = None
    s_lo, z_lo = 0.0, float(overhead)  # largest scale known to fit, and its packet size
    s_hi, z_hi = math.inf, math.inf  # smallest scale known not to fit
    scale = 1.0
    for _ in range(_FIT_TRIES):
        plan = fit(scale)
        tensors, pmeta, nvals = pack(plan)
        if cfg.budget_bytes is None:
            best = (tensors, pmeta, nvals, plan[0])
            break
        size = len(wire.encode("update", tensors, {**size_meta, **pmeta}))
        if size <= cfg.budget_bytes:
            if best is None or nvals > best[2]:
                best = (tensors, pmeta, nvals, plan[0])
            s_lo, z_lo = scale, float(size)
            if size >= 0.98 * cfg.budget_bytes or scale >= headroom:
                break
        else:
            s_hi, z_hi = scale, float(size)
        # secant step on size(scale) towards the budget, inside the known bracket
        target = 0.99 * cfg.budget_bytes
        if math.isinf(s_hi):
            nxt = s_lo * (target - overhead) / max(1.0, z_lo - overhead)
        else:
            nxt = s_lo + (target - z_lo) * (s_hi - s_lo) / max(1.0, z_hi - z_lo)
        nxt = min(nxt, headroom, s_hi * 0.995)
        if best is not None and nxt <= s_lo * 1.005:
            break
        scale = max(nxt, 0.0)
    if best is None:  # nothing fitted (never seen in practice): send an empty update
        plan = (np.zeros(K, np.int64), np.zeros(K, np.int64), np.zeros(0, np.int64))
        tensors, pmeta, nvals = pack(plan)
        best = (tensors, pmeta, nvals, plan[0])
    tensors, pmeta, nvals, modes = best
    meta.update(pmeta)

    # Decode our own packet exactly as the device will (minus result_hash, which needs the result).
    applied = decode_update(wire.decode(wire.encode("update", tensors, meta), expect_kind="update"))
    mirror = apply_delta(base, applied)
    meta["result_hash"] = state_hash(mirror)
    packet = wire.encode("update", tensors, meta)

    new_residual: AdapterState = {}
    lost_sq = 0.0
    res_sq = 0.0
    for k, s, n in zip(keys, starts, numels):
        ap = applied[k].reshape(-1)
        r = full[s:s + n] - ap
        new_residual[k] = r.view(base[k].shape)
        rs = float(torch.dot(r, r))
        res_sq += rs
        if delta is full:
            lost_sq += rs
        else:
            d = delta[s:s + n] - ap
            lost_sq += float(torch.dot(d, d))
    dn2 = float(torch.dot(delta, delta)) if N else 0.0
    counts = np.bincount(modes, minlength=4) if K else np.zeros(4, np.int64)
    stats = UpdateStats(
        dense_fp32_bytes=4 * N, dense_fp16_bytes=2 * N, packet_bytes=len(packet),
        kept_entries=nvals, total_entries=N,
        energy_kept=1.0 - lost_sq / dn2 if dn2 > 0 else 1.0,
        modes={m: int(c) for m, c in zip(MODES, counts)}, encode_s=time.perf_counter() - t0,
        budget_bytes=cfg.budget_bytes, payload_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        delta_norm=math.sqrt(dn2), residual_norm=math.sqrt(res_sq))
    return packet, mirror, new_residual, stats


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
