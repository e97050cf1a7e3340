"""The torch-free half of the token codes: code names, the entropy stream's bounded expansion and the
token basis's digest. The cloud's inbox checks uplink packets with these alone, so ``cdcca cloud
receive`` never imports torch (~1.5 s); :mod:`~cdcca.uplink.codec` builds the tensors on top of them.
"""

from __future__ import annotations

import hashlib
import lzma
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cdcca.assets import cache_dir
from cdcca.trained_pair import active
from cdcca.uplink.config import PCA_CODE, TOKEN_BASIS_PATH
from cdcca.wire import PacketError

FULL_CODES = ("full-int8", "full-fp16")
EC_STEP = 1.0                   # pcaK-ec: the one rounding step of every coefficient (normalized-token units)
EC_BITS_ESTIMATE = 2.3          # pcaK-ec: bits a coefficient costs after LZMA (measured 1.9–2.2 at step 1.0)
EC_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9}]   # raw LZMA2: no container header on the wire
CODE_NAMES = "full-int8, full-fp16, pca<K>-int8, pca<K>-int4, pca<K>-ec"
BASIS_DIGEST_PREFIX = b"cdcca.token_basis/1"


@dataclass(frozen=True)
class TokenCode:
    """A parsed code name: ``k`` components (0 = every channel) at ``bits`` per value; ``entropy``:
    int8 codes on the fixed step :data:`EC_STEP`, LZMA-coded (their size depends on the tokens)."""

    name: str
    k: int
    bits: int
    entropy: bool = False

    def bytes_per_token(self, token_dim: int) -> int:
        """Wire bytes of one kept token: its values, its fp16 scale (quantized codes) — not its position.
        For an entropy code an estimate (:data:`EC_BITS_ESTIMATE`); the packet says the real size."""
        if self.k == 0:
            return token_dim * 2 if self.bits == 16 else token_dim + 2
        if self.entropy:
            return round(self.k * EC_BITS_ESTIMATE / 8) + 4    # codes, (μ, σ)
        return (self.k * self.bits + 7) // 8 + 2 + 4          # codes, scale, (μ, σ)


def parse_code(name: str) -> TokenCode:
    """``full-int8`` | ``full-fp16`` | ``pca<K>-int8`` | ``pca<K>-int4`` | ``pca<K>-ec``; ValueError otherwise."""
    if name in FULL_CODES:
        return TokenCode(name, 0, 8 if name == "full-int8" else 16)
    m = PCA_CODE.fullmatch(str(name))
    if m is None:
        raise ValueError(f"token code {str(name)[:40]!r} is not one of {CODE_NAMES}")
    if m.group(2) == "ec":
        return TokenCode(name, int(m.group(1)), 8, entropy=True)
    return TokenCode(name, int(m.group(1)), int(m.group(2)[3:]))


def need(cond: bool, message: str) -> None:
    """The one way an uplink check fails: a one-line :class:`~cdcca.wire.PacketError`."""
    if not cond:
        raise PacketError(f"uplink packet: {message}")


def expand_ec_stream(stream: np.ndarray, M: int, k: int) -> bytes:
    """The M·k int8 codes (component-major bytes) of a ``pcaK-ec`` stream, reading at most M·k bytes out of
    it: a stream that would expand further, stops early or carries trailing bytes is refused."""
    need(stream.dtype == np.uint8 and stream.ndim == 1, "tensor 'codes' must be a 1-D uint8 stream")
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=EC_FILTERS)
    try:
        raw = dec.decompress(stream.tobytes(), max_length=M * k)
    except lzma.LZMAError as exc:
        raise PacketError(f"uplink packet: tensor 'codes' is not a valid LZMA2 stream ({exc})") from None
    need(len(raw) == M * k and dec.eof and not dec.unused_data,
         f"tensor 'codes' must expand to exactly {M}×{k} codes and end there")
    return raw


def basis_digest(mean: np.ndarray, encoder: np.ndarray, decoder: np.ndarray) -> str:
    """The 16-hex digest a packet names its basis by: SHA-256 of the fp16 values (the one definition,
    used by :class:`~cdcca.uplink.codec.TokenBasis` and by the torch-free :func:`read_basis_info`)."""
    h = hashlib.sha256(BASIS_DIGEST_PREFIX)
    for a in (mean, encoder, decoder):
        h.update(np.ascontiguousarray(a, dtype=np.float16).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class BasisInfo:
    """What checking a packet needs of a token basis (a :class:`~cdcca.uplink.codec.TokenBasis` has the same)."""

    digest: str
    k: int
    dim: int


def read_basis_info(path: str | os.PathLike[str]) -> BasisInfo:
    """Digest and size of a token-basis file, read with numpy (no torch); ValueError when it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            mean, encoder, decoder = (f.get_tensor(name) for name in ("mean", "encoder", "decoder"))
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a token-basis file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild it with "
                         "cdcca.uplink.build_token_basis()") from None
    if mean.ndim != 1 or encoder.ndim != 2 or encoder.shape != decoder.shape or encoder.shape[1] != mean.shape[0]:
        raise ValueError(f"{path}: a token basis needs mean (C,), encoder and decoder (K, C)")
    if not all(np.isfinite(a.astype(np.float32)).all() for a in (mean, encoder, decoder)):
        raise ValueError(f"{path}: token basis tensors must be finite")
    return BasisInfo(basis_digest(mean, encoder, decoder), encoder.shape[0], encoder.shape[1])


def basis_file() -> Path:
    """Where the served pair's basis is: its ``token_basis.safetensors``, or for the shipped pair on a
    trimmed install (none packaged) the one :func:`~cdcca.uplink.codec.default_token_basis` builds once
    under ``$CDCCA_CACHE`` (maybe not yet)."""
    pair = active()
    path = pair.root / "token_basis.safetensors"
    if path.is_file() or not pair.shipped:
        return path
    return cache_dir() / "token_basis.safetensors"


def default_basis_info() -> BasisInfo:
    """This install's basis digest and size, read without torch (cached per file)."""
    path = basis_file()
    if not path.is_file():
        if not active().shipped:
            active().file(path.name)       # the pair's own basis is missing: refused, naming how to finish the pair
        raise FileNotFoundError(f"no token basis at {TOKEN_BASIS_PATH} or {path}: build it once with "
                                "python -c 'import cdcca.uplink as u; u.default_token_basis()'")
    return _basis_info_of(path)


@lru_cache(maxsize=4)
def _basis_info_of(path: Path) -> BasisInfo:
    return read_basis_info(path)
