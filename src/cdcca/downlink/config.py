"""DWC format constants, :class:`DWCConfig`, :class:`UpdateStats` and the adaptive budget rule:
the bottom of the downlink package, shared by selection, index, quantization and packet code."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

DWC_FORMAT = "1"
MODES = ("skip", "sparse", "bitmask", "dense")
_SKIP, _SPARSE, _BITMASK, _DENSE = range(4)
QUANTIZERS = ("int8", "int4", "nf4", "fp16")
COMPRESSORS = ("none", "zlib", "lzma")
SCOPES = ("global", "per_tensor")
_WIDTHS = (1, 2, 4)  # sparse index word sizes in bytes
_ESC = {1: 2**8 - 1, 2: 2**16 - 1, 4: 2**32 - 1}  # escape word per width (see the gap code in the package doc)
_MAX_TENSOR_ENTRIES = 2**31 - 1  # table counts are int32
MAX_DECODE_ENTRIES = 2**28  # a packet may not make the device allocate more than 1 GiB of delta
_MAX_KEYS_JSON = 16 * 2**20


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
