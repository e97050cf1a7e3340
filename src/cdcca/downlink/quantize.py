"""Group-wise quantization of the sent value stream (int8, int4, nf4, fp16) with fp16 scales under
one packet-wide power of two, so tiny deltas survive fp16 and codes never clip."""

from __future__ import annotations

import math

import numpy as np
import torch

from cdcca.wire import PacketError

# QLoRA NormalFloat-4 codebook (Dettmers et al. 2023), ascending; index 7 is exactly 0.
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
_NF4_MID = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2
_VALUE_BYTES = {"int8": 1.0, "int4": 0.5, "nf4": 0.5, "fp16": 2.0}
_QMAX = {"int8": 127.0, "int4": 7.0, "nf4": 1.0}


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
