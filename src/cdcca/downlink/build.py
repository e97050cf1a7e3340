"""Building an ``"update"`` packet on the cloud: select what fits the byte budget, pack and
measure it, then decode it exactly as the device will, so the cloud's mirror stays bit-identical."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from cdcca import wire
from cdcca.adapter_state import AdapterState, state_hash
from cdcca.downlink.config import _DENSE, _MAX_TENSOR_ENTRIES, _SKIP, _SPARSE, DWC_FORMAT, MODES, DWCConfig, UpdateStats
from cdcca.downlink.indices import _encode_gaps
from cdcca.downlink.packet import _compress, apply_delta, decode_update
from cdcca.downlink.quantize import _VALUE_BYTES, _quantize
from cdcca.downlink.selection import _Selector

_HEADER_SLACK = 128
_COMPRESS_HEADROOM = 2.0  # re-fits may spend up to this multiple of the raw payload budget
_FIT_TRIES = 6

Plan = tuple[np.ndarray, np.ndarray, np.ndarray]  # (mode per tensor, sparse width per tensor, global positions)


def _u8(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


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


@dataclass
class _Round:
    """One update's inputs laid out flat: adapter keys in sorted order, each tensor's size and offset
    in the flat vectors, ``full = target - base``, the vector ``delta`` compressed, and the key list blob."""

    keys: list[str]
    numels: np.ndarray
    starts: np.ndarray
    N: int
    full: torch.Tensor
    delta: torch.Tensor
    keys_json: bytes
    keys_blob: bytes
    keys_codec: str

    @property
    def K(self) -> int:
        return len(self.keys)


def _prepare(base: AdapterState, target: AdapterState, residual: AdapterState | None, cfg: DWCConfig) -> _Round:
    """Check the states and flatten Δ (tensors in sorted-key order; see the package doc for the
    error-feedback rule)."""
    keys = _check_states(base, target, residual)
    numels = np.array([base[k].numel() for k in keys], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(numels)[:-1]]).astype(np.int64) if keys else numels
    N = int(numels.sum())
    full = torch.empty(N, dtype=torch.float32)
    for k, s, n in zip(keys, starts, numels):
        torch.sub(target[k].detach().float().reshape(-1), base[k].detach().float().reshape(-1),
                  out=full[s:s + n])
    if cfg.error_feedback or residual is None:
        delta = full
    else:  # increment only: target - prev_target, prev_target = base + residual
        delta = full - torch.cat([residual[k].detach().float().reshape(-1) for k in keys]) if keys else full
    keys_json = json.dumps({"names": keys, "shapes": [list(base[k].shape) for k in keys]},
                           separators=(",", ":")).encode("utf-8")
    keys_blob, keys_codec = _compress(keys_json, cfg.compressor)
    return _Round(keys, numels, starts, N, full, delta, keys_json, keys_blob, keys_codec)


def _payload_budget(job: _Round, cfg: DWCConfig, size_meta: dict[str, str]) -> tuple[float | None, int]:
    """(bytes left for values and indices, bytes of an empty packet); (None, 0) without a budget.

    The fixed part is measured by encoding a skeleton packet whose meta values have their final widths."""
    if cfg.budget_bytes is None:
        return None, 0
    skeleton = wire.encode("update", {
        "dwc::keys": _u8(job.keys_blob), "dwc::idx": _u8(b""), "dwc::q": _u8(b""),
        "dwc::scale": torch.empty(0, dtype=torch.float16)},
        {**size_meta, "n_values": "0" * 10, "scale_exp": "-0000", "keys_codec": "none",
         "idx_codec": "none", "q_codec": "none", "keys_nbytes": "0" * 10,
         "idx_nbytes": "0" * 10, "q_nbytes": "0" * 10})
    overhead = len(skeleton)
    fixed = overhead + _HEADER_SLACK + 16 * job.K + 2 + 1  # + table, scale/nibble rounding
    if fixed > cfg.budget_bytes:
        raise ValueError(f"DWCConfig.budget_bytes={cfg.budget_bytes} is below the fixed packet "
                         f"overhead ({fixed} bytes) for this {job.K}-tensor adapter; raise it")
    return float(cfg.budget_bytes - fixed), overhead


def _selectors(job: _Round, cfg: DWCConfig, payload_budget: float | None,
               headroom: float) -> list[tuple[int, float, _Selector]]:
    """One ``(offset, budget share, selector)`` per scope unit: the whole delta, or each tensor.
    Candidates are found once, with ``headroom`` for what compression will save."""
    a = job.delta.abs()
    if job.N and not math.isfinite(float(a.max())):  # max propagates NaN
        raise ValueError("the delta (target - base, residual) contains inf/NaN; refusing to build an update")
    cv = _VALUE_BYTES[cfg.quantizer] + (0.0 if cfg.quantizer == "fp16" else 2.0 / cfg.group_size)
    cap = None if payload_budget is None else payload_budget * headroom
    if cfg.scope == "global" or job.K <= 1:
        return [(0, 1.0, _Selector(a, job.starts, job.numels, cap, cfg.energy, cv))]
    N = job.N
    return [(int(s), n / N, _Selector(a[s:s + n], np.zeros(1, np.int64), np.array([n]),
                                      None if cap is None else cap * n / N, cfg.energy, cv))
            for s, n in zip(job.starts, job.numels)]


def _fit(units: list[tuple[int, float, _Selector]], payload_budget: float | None, scale: float) -> Plan:
    """The selection for ``scale`` times the payload budget, units merged into one global plan."""
    parts = [u.fit(None if payload_budget is None else payload_budget * scale * share)
             for _, share, u in units]
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] + off for (off, _, _), p in zip(units, parts)]))


def _index_streams(job: _Round, plan: Plan) -> tuple[np.ndarray, list[bytes], np.ndarray]:
    """(the K x 4 table, the sparse/bitmask index streams in key order, every sent global position)."""
    modes, widths, sel = plan
    starts, numels = job.starts, job.numels
    sel_tid = np.searchsorted(starts + numels, sel, side="right")
    bounds = np.searchsorted(sel_tid, np.arange(job.K + 1), side="left")
    table = np.zeros((job.K, 4), dtype=np.int64)
    streams: list[bytes] = []
    send: list[np.ndarray] = []
    for i in range(job.K):
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
    return table, streams, np.concatenate(send) if send else np.zeros(0, np.int64)


def _pack(job: _Round, cfg: DWCConfig, plan: Plan) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """(the packet's tensors, its per-packing meta, values sent) for one selection."""
    table, streams, allpos = _index_streams(job, plan)
    qbytes, scales, e = _quantize(job.delta[torch.from_numpy(allpos)], cfg.quantizer, cfg.group_size)
    idx_raw = table.astype("<i4").tobytes() + b"".join(streams)
    idx_blob, idx_codec = _compress(idx_raw, cfg.compressor)
    q_blob, q_codec = _compress(qbytes, cfg.compressor)
    tensors = {"dwc::keys": _u8(job.keys_blob), "dwc::idx": _u8(idx_blob), "dwc::q": _u8(q_blob),
               "dwc::scale": scales}
    pmeta = {"n_values": str(int(allpos.size)), "scale_exp": str(e), "keys_codec": job.keys_codec,
             "idx_codec": idx_codec, "q_codec": q_codec, "keys_nbytes": str(len(job.keys_json)),
             "idx_nbytes": str(len(idx_raw)), "q_nbytes": str(len(qbytes))}
    return tensors, pmeta, int(allpos.size)


def _next_scale(budget: int, overhead: int, headroom: float, lo: tuple[float, float], hi: tuple[float, float]) -> float:
    """Secant step on size(scale) towards 99 % of the budget, inside the known bracket: ``lo`` is the
    largest (scale, size) known to fit, ``hi`` the smallest known not to (inf while none)."""
    (s_lo, z_lo), (s_hi, z_hi) = lo, hi
    target = 0.99 * budget
    if math.isinf(s_hi):
        nxt = s_lo * (target - overhead) / max(1.0, z_lo - overhead)
    else:
        nxt = s_lo + (target - z_lo) * (s_hi - s_lo) / max(1.0, z_hi - z_lo)
    return min(nxt, headroom, s_hi * 0.995)


def _best_packing(job: _Round, cfg: DWCConfig, units: list[tuple[int, float, _Selector]], payload_budget: float | None,
                  overhead: int, size_meta: dict[str, str],
                  headroom: float) -> tuple[dict[str, torch.Tensor], dict[str, str], int, np.ndarray]:
    """Fit, pack and measure the real packet size (exact: result_hash has a fixed length); when the
    blobs compressed well, re-fit with the budget scaled up by the room left (a few tries).
    Returns (tensors, meta, values sent, mode per tensor) of the largest packet that fits."""
    best: tuple[dict[str, torch.Tensor], dict[str, str], int, np.ndarray] | None = None
    lo = (0.0, float(overhead))  # largest scale known to fit, and its packet size
    hi = (math.inf, math.inf)  # smallest scale known not to fit
    scale = 1.0
    for _ in range(_FIT_TRIES):
        plan = _fit(units, payload_budget, scale)
        tensors, pmeta, nvals = _pack(job, cfg, plan)
        if cfg.budget_bytes is None:
            return tensors, pmeta, nvals, plan[0]
        size = len(wire.encode("update", tensors, {**size_meta, **pmeta}))
        if size <= cfg.budget_bytes:
            if best is None or nvals > best[2]:
                best = (tensors, pmeta, nvals, plan[0])
            lo = (scale, float(size))
            if size >= 0.98 * cfg.budget_bytes or scale >= headroom:
                break
        else:
            hi = (scale, float(size))
        nxt = _next_scale(cfg.budget_bytes, overhead, headroom, lo, hi)
        if best is not None and nxt <= lo[0] * 1.005:
            break
        scale = max(nxt, 0.0)
    if best is None:  # nothing fitted (never seen in practice): send an empty update
        plan = (np.zeros(job.K, np.int64), np.zeros(job.K, np.int64), np.zeros(0, np.int64))
        tensors, pmeta, nvals = _pack(job, cfg, plan)
        best = (tensors, pmeta, nvals, plan[0])
    return best


def _residual(job: _Round, base: AdapterState, applied: AdapterState) -> tuple[AdapterState, float, float]:
    """(new residual ``(target - base) - applied`` per key, ‖Δ - applied‖², ‖new residual‖²)."""
    new_residual: AdapterState = {}
    lost_sq = 0.0
    res_sq = 0.0
    for k, s, n in zip(job.keys, job.starts, job.numels):
        ap = applied[k].reshape(-1)
        r = job.full[s:s + n] - ap
        new_residual[k] = r.view(base[k].shape)
        rs = float(torch.dot(r, r))
        res_sq += rs
        if job.delta is job.full:
            lost_sq += rs
        else:
            d = job.delta[s:s + n] - ap
            lost_sq += float(torch.dot(d, d))
    return new_residual, lost_sq, res_sq


def build_update(base: AdapterState, target: AdapterState, residual: AdapterState | None,
                 cfg: DWCConfig, *, device_id: str, base_version: int, new_version: int,
                 round: int = 0) -> tuple[bytes, AdapterState, AdapterState, UpdateStats]:
    """Compress ``target - base`` (+ error feedback, see the package doc) into an ``"update"`` packet.

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
    job = _prepare(base, target, residual, cfg)
    meta: dict[str, str] = {
        "dwc_format": DWC_FORMAT, "device_id": str(device_id), "base_version": str(int(base_version)),
        "new_version": str(int(new_version)), "base_hash": state_hash(base), "round": str(int(round)),
        "quantizer": cfg.quantizer, "group_size": str(cfg.group_size), "compressor": cfg.compressor,
        "scope": cfg.scope, "error_feedback": str(cfg.error_feedback).lower(),
    }
    size_meta = {**meta, "result_hash": "0" * 64}  # same length as the real hash
    payload_budget, overhead = _payload_budget(job, cfg, size_meta)
    headroom = _COMPRESS_HEADROOM if cfg.compressor != "none" else 1.0
    units = _selectors(job, cfg, payload_budget, headroom)
    tensors, pmeta, nvals, modes = _best_packing(job, cfg, units, payload_budget, overhead, size_meta, headroom)
    meta.update(pmeta)

    # Decode our own packet exactly as the device will (minus result_hash, which needs the result).
    applied = decode_update(wire.decode(wire.encode("update", tensors, meta), expect_kind="update"))
    mirror = apply_delta(base, applied)
    meta["result_hash"] = state_hash(mirror)
    packet = wire.encode("update", tensors, meta)

    new_residual, lost_sq, res_sq = _residual(job, base, applied)
    dn2 = float(torch.dot(job.delta, job.delta)) if job.N else 0.0
    counts = np.bincount(modes, minlength=4) if job.K else np.zeros(4, np.int64)
    stats = UpdateStats(
        dense_fp32_bytes=4 * job.N, dense_fp16_bytes=2 * job.N, packet_bytes=len(packet),
        kept_entries=nvals, total_entries=job.N,
        energy_kept=1.0 - lost_sq / dn2 if dn2 > 0 else 1.0,
        modes={m: int(c) for m, c in zip(MODES, counts)}, encode_s=time.perf_counter() - t0,
        budget_bytes=cfg.budget_bytes, payload_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        delta_norm=math.sqrt(dn2), residual_norm=math.sqrt(res_sq))
    return packet, mirror, new_residual, stats
