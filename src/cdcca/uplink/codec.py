"""Compact codes for uploaded visual tokens.

Device and cloud share the frozen encoder, so they can also share a fixed linear code for its
tokens, fitted once on source train images and shipped with the weights
(``weights/token_basis.safetensors``): a PCA of layer-normalized tokens in the metric of the two
bridges' token projections (:class:`TokenBasis`). A ``pcaK-int8`` / ``pcaK-int4`` code sends a kept
token as its channel mean and std (fp16) and K coefficients, quantized with a per-token fp16 scale;
a ``pcaK-ec`` code (the default, ``pca256-ec``) rounds the K coefficients on one fixed step
(:data:`EC_STEP`) and entropy-codes them, component after component, with LZMA — the leading
components are wide and cost ~7 bits, the trailing ones narrow and cost ~1, where a per-token absmax
scale would spend 4 bits on each and still lose the small ones. The cloud reconstructs the token
(:meth:`TokenBasis.reconstruct`) before its bridge. ``full-int8`` / ``full-fp16`` send all channels
(the format-1 packets, and the fallback for tokens of another width).
Every packet names its code and the basis digest, so a cloud with another basis refuses it.
"""

from __future__ import annotations

import lzma
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from cdcca.atomic import write_safetensors
from cdcca.data.augmix import corrupt_mixed
from cdcca.data.corruptions import CORRUPTIONS
from cdcca.data.easyvqa import VQASet
from cdcca.data.features import cached_features
from cdcca.model.encoder import encode_images, load_encoder
from cdcca.trained_pair import TrainedPair, active
from cdcca.uplink.codes import (  # noqa: F401  (re-exported: the code names' historical home)
    CODE_NAMES,
    EC_BITS_ESTIMATE,
    EC_FILTERS,
    EC_STEP,
    FULL_CODES,
    TokenCode,
    basis_digest,
    basis_file,
    expand_ec_stream,
    parse_code,
)
from cdcca.uplink.config import TOKEN_DIM, UTSConfig
from cdcca.uplink.tokens import read_tensor_file

BASIS_COMPONENTS = 256          # components shipped; pcaK uses the first K (PCA components are nested)
BASIS_FIT_IMAGES = 600          # train images the shipped basis is fitted on, clean and again shifted


@dataclass
class TokenBasis:
    """A linear code for layer-normalized tokens: ``encoder`` (K, C) and ``decoder`` (K, C) rows per
    component, ``mean`` (C,) of the normalized tokens; values as stored (fp16).

    A token x travels as its channel mean μ and std σ (fp16) and the coefficients
    ``c = (x̂ − mean) @ encoder[:k].T`` of x̂ = (x − μ) / σ; it comes back as ``σ · (c @ decoder[:k] + mean) + μ``.
    Both bridges read a token only through LayerNorm → token_proj, so the code spends its components
    where those projections look (:func:`fit_token_basis` with ``metric``); components are nested, so
    pcaK uses the first K of one shipped basis."""

    mean: torch.Tensor
    encoder: torch.Tensor
    decoder: torch.Tensor
    n: int = 0
    digest: str = field(init=False)

    def __post_init__(self):
        self.mean, self.encoder, self.decoder = (t.half().float() for t in (self.mean, self.encoder, self.decoder))
        if self.mean.ndim != 1 or self.encoder.ndim != 2 or self.encoder.shape != self.decoder.shape \
                or self.encoder.shape[1] != self.mean.shape[0]:
            raise ValueError(f"TokenBasis needs mean (C,), encoder and decoder (K, C); got {tuple(self.mean.shape)}, "
                             f"{tuple(self.encoder.shape)} and {tuple(self.decoder.shape)}")
        if not all(torch.isfinite(t).all() for t in (self.mean, self.encoder, self.decoder)):
            raise ValueError("TokenBasis tensors must be finite")
        self.digest = basis_digest(*(t.half().numpy() for t in (self.mean, self.encoder, self.decoder)))

    @property
    def k(self) -> int:
        return self.encoder.shape[0]

    @property
    def dim(self) -> int:
        return self.encoder.shape[1]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as fp16 safetensors (~1.3 MB for 2 × 256 × 1280), atomically."""

        path = Path(path)
        write_safetensors(path, {"mean": self.mean.half(), "encoder": self.encoder.half(), "decoder": self.decoder.half()},
                          metadata={"format": "cdcca.token_basis/1", "n": str(int(self.n))})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenBasis:
        (mean, encoder, decoder), n = read_tensor_file(path, ("mean", "encoder", "decoder"), "token-basis",
                                                       "cdcca.uplink.build_token_basis()")
        return cls(mean, encoder, decoder, n)

    def project(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, C) tokens → (M, k) coefficients and (M, 2) fp16 (μ, σ) per token."""
        x, norms = _normalize(rows)
        return (x - self.mean) @ self.encoder[:k].T, norms

    def reconstruct(self, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """(M, k) coefficients and (M, 2) (μ, σ) → (M, C) tokens."""
        norms = norms.float()
        return (codes.float() @ self.decoder[:codes.shape[1]] + self.mean) * norms[:, 1:] + norms[:, :1]


def _normalize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-normalized rows (no affine) and their fp16 (μ, σ); σ is what fp16 stores, so x̂ · σ + μ ≈ x."""
    rows = rows.float()
    norms = torch.stack([rows.mean(-1), rows.std(-1, unbiased=False)], -1).half()
    if not torch.isfinite(norms).all():
        raise ValueError("token values are too large for fp16 channel statistics")
    mu, sd = norms.float().unbind(-1)
    return (rows - mu[:, None]) / sd.clamp_min(1e-6)[:, None], norms


def bridge_metric(*projections: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    """(C, C) metric Σ AᵀA / tr(AᵀA) · C / n + ridge · I for the bridges' token projections A (d, C) =
    token_proj.weight · token_norm.weight: the error a bridge sees, plus a floor for everything else."""
    C = projections[0].shape[1]
    M = ridge * torch.eye(C, dtype=torch.float64)
    for a in projections:
        ata = a.double().T @ a.double()
        M += ata / ata.trace() * C / len(projections)
    return M


@torch.no_grad()
def fit_token_basis(tokens: torch.Tensor, k: int = BASIS_COMPONENTS, metric: torch.Tensor | None = None) -> TokenBasis:
    """PCA of layer-normalized (N, P, C) or (M, C) tokens (every position pooled) in the metric M
    (default: plain PCA): whiten by M^½, take the top k directions U, encode with U^T M^½, decode with
    U^T M^-½ (so decode ∘ encode is the identity on the kept span)."""
    x = tokens.reshape(-1, tokens.shape[-1])
    C = x.shape[1]
    if len(x) < 2 or not 1 <= k <= C:
        raise ValueError(f"need ≥ 2 tokens and 1 ≤ k ≤ {C}; got {len(x)} tokens, k={k}")
    root = inv_root = torch.eye(C, dtype=torch.float64)
    if metric is not None:
        lam, Q = torch.linalg.eigh(metric.double())
        root, inv_root = (Q * lam.sqrt()) @ Q.T, (Q / lam.sqrt()) @ Q.T
    xs = torch.cat([_normalize(x[s:s + 8192])[0] for s in range(0, len(x), 8192)])
    mean = xs.double().mean(0)
    cov = torch.zeros(C, C, dtype=torch.float64)
    for start in range(0, len(xs), 8192):
        r = (xs[start:start + 8192].double() - mean) @ root
        cov += r.T @ r
    U = torch.linalg.eigh(cov / len(xs))[1].flip(1)[:, :k]
    return TokenBasis(mean.float(), (root @ U).T.float(), (inv_root @ U).T.float(), len(x))


def _fit_set(data: VQASet, n_images: int = BASIS_FIT_IMAGES) -> torch.Tensor:
    """Tokens a basis is fitted on: the first ``n_images`` clean train images of the pair's task (the
    cached features) and the next ``n_images`` under the cloud's training corruptions (each its own,
    severity 3–5, seed 0) — the shifted tokens the device uploads lie off the clean ones' principal span."""

    n_images = min(n_images, len(data.images) // 2)          # a small task: half clean, half shifted
    clean = cached_features(data, limit=n_images)
    images = data.images[n_images:2 * n_images]
    shifted = encode_images(load_encoder(), corrupt_mixed(images, sorted(CORRUPTIONS), (3, 5), seed=0))
    return torch.cat([clean.float(), shifted.float()])


def _bridge_projections(root: Path) -> list[torch.Tensor]:
    """token_proj.weight · token_norm.weight of a pair's cloud and device bridges."""
    from safetensors import safe_open

    out = []
    for role in ("cloud", "device"):
        with safe_open(str(root / f"{role}.safetensors"), framework="pt") as f:
            out.append(f.get_tensor("bridge.token_proj.weight").float() * f.get_tensor("bridge.token_norm.weight").float())
    return out


def build_token_basis(out: str | os.PathLike[str] | None = None, pair: TrainedPair | None = None) -> Path:
    """Fit a pair's basis (default: the served pair's; offline: packaged encoder, the task's train images and
    the pair's bridges; ~1 min on 2 cores) and write it (default: the pair's ``token_basis.safetensors``)."""
    pair = pair or active()
    tokens = _fit_set(pair.task.split("train"))
    basis = fit_token_basis(tokens, k=min(BASIS_COMPONENTS, tokens.shape[-1]),
                            metric=bridge_metric(*_bridge_projections(pair.root)))
    path = basis.save(out or pair.root / "token_basis.safetensors")
    _basis_of.cache_clear()
    return path


def default_token_basis() -> TokenBasis:
    """The served pair's basis (256 × 1280); for the shipped pair on a trimmed install (none packaged) the
    one built once under ``$CDCCA_CACHE`` from the packaged encoder and images, so both sides agree."""
    path = basis_file()
    if not path.is_file():
        if not active().shipped:
            active().file(path.name)           # refused in one line: the pair was never finished
        build_token_basis(path)
    return _basis_of(path)


@lru_cache(maxsize=4)
def _basis_of(path: Path) -> TokenBasis:
    return TokenBasis.load(path)


# ----------------------------------------------------------------------------------------------
# quantization: symmetric per-token absmax, fp16 scales
# ----------------------------------------------------------------------------------------------
def quantize_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float → symmetric per-row codes (int8 in ±127, or int4 in ±7 packed two per byte) and fp16
    scales, x ≈ q · scale. The error per value is at most scale / 2, with scale ≥ absmax / levels (equal
    up to fp16 rounding: the scale is rounded up, never down, so no value clips)."""
    levels = 127 if bits == 8 else 7
    x = x.float()
    target = x.abs().amax(-1) / levels
    scale = target.half()
    scale = torch.where(scale.float() < target, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    if not torch.isfinite(scale).all():
        raise ValueError(f"token values are too large for an fp16 scale (|x| > {65504 * levels:.2g})")
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    q = torch.where(scale[:, None] > 0, (x / s).round().clamp(-levels, levels), torch.zeros_like(x)).to(torch.int8)
    return (q if bits == 8 else pack_int4(q)), scale


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) float → int8 (M, C) and fp16 per-row scales with x ≈ q · scale (symmetric absmax)."""
    return quantize_codes(x, 8)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (or unpacked int4) codes (M, K) and fp16 scales (M,) → float32 (M, K)."""
    return q.float() * scale.float()[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 in −8..7 → (M, ⌈K/2⌉) uint8, two's-complement nibbles, low nibble first."""
    if q.shape[1] % 2:
        q = torch.cat([q, torch.zeros(len(q), 1, dtype=q.dtype)], 1)
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (M, ⌈k/2⌉) uint8 → (M, k) int8 in −8..7."""
    both = torch.stack([packed & 0xF, packed >> 4], -1).reshape(len(packed), -1)[:, :k].to(torch.int16)
    return torch.where(both > 7, both - 16, both).to(torch.int8)


# ----------------------------------------------------------------------------------------------
# a packet's token tensors: encode on the device, strict decode on the cloud
# ----------------------------------------------------------------------------------------------
def packet_code(cfg: UTSConfig, token_dim: int, basis: TokenBasis | None = None) -> tuple[TokenCode, TokenBasis | None]:
    """The code a packet of ``token_dim``-wide tokens uses under cfg, and its basis: cfg.token_code when
    the tokens have the basis's width, else the full-channel ``token_dtype`` (tiny test models)."""
    full = parse_code(f"full-{cfg.token_dtype}")
    if cfg.token_code == "full" or (basis is None and token_dim != TOKEN_DIM):
        return full, None
    code = parse_code(cfg.token_code)
    if code.k >= token_dim:       # an encoder with no more channels than the code's components: send them whole
        return full, None
    basis = basis or default_token_basis()
    if token_dim != basis.dim:
        return full, None
    if code.k > basis.k:
        raise ValueError(f"token code {code.name} needs {code.k} components; the basis has {basis.k}")
    return code, basis


def encode_rows(flat: torch.Tensor, code: TokenCode, basis: TokenBasis | None) -> dict[str, torch.Tensor]:
    """The packet's token tensors for (M, C) kept rows: ``tokens`` (+ ``scales``) for a full code,
    ``codes`` + ``scales`` + ``norms`` (μ, σ) for a pca code."""
    if code.entropy:
        coeffs, norms = basis.project(flat, code.k)
        return {"codes": entropy_encode(coeffs), "norms": norms}
    if code.k:
        coeffs, norms = basis.project(flat, code.k)
        q, scales = quantize_codes(coeffs, code.bits)
        return {"codes": q, "scales": scales, "norms": norms}
    if code.bits == 8:
        q, scales = quantize_int8(flat)
        return {"tokens": q, "scales": scales}
    if flat.abs().max() > torch.finfo(torch.float16).max:
        raise ValueError("token values overflow fp16; use token_dtype='int8'")
    return {"tokens": flat.half()}


def entropy_encode(coeffs: torch.Tensor) -> torch.Tensor:
    """(M, K) coefficients → uint8 raw-LZMA2 stream of their int8 codes round(c / EC_STEP), component-major
    (one component's values side by side, so the coder learns each one's narrow range). Coefficients of
    a layer-normalized token stay far inside ±127 steps (|c| < 100 measured); beyond, they clip."""
    q = _ec_quantize(coeffs)
    stream = lzma.compress(q.T.contiguous().numpy().tobytes(), format=lzma.FORMAT_RAW, filters=EC_FILTERS)
    return torch.frombuffer(bytearray(stream), dtype=torch.uint8)


def _ec_quantize(coeffs: torch.Tensor) -> torch.Tensor:
    return (coeffs.float() / EC_STEP).round().clamp(-127, 127).to(torch.int8)


def entropy_decode(stream: torch.Tensor, M: int, k: int) -> torch.Tensor:
    """Inverse of :func:`entropy_encode`: (M, k) float32, reading at most M·k bytes out of the stream
    (a stream that would expand further, stops early or carries trailing bytes is refused)."""
    return _ec_coefficients(expand_ec_stream(stream.numpy(), M, k), M, k)


def _ec_coefficients(raw: bytes, M: int, k: int) -> torch.Tensor:
    """(M, k) float32 coefficients from the checked component-major int8 codes of a pcaK-ec stream."""
    q = torch.frombuffer(bytearray(raw), dtype=torch.int8).reshape(k, M)
    return q.T.float() * EC_STEP


def decode_rows(t: dict[str, torch.Tensor], M: int, code: TokenCode, basis: TokenBasis | None,
                ec_codes: bytes = b"") -> torch.Tensor:
    """(M, C) float32 kept tokens from a packet's tensors that :func:`~cdcca.uplink.check.check_uplink`
    passed: dequantized, and for a pca code reconstructed on the basis the packet names (``ec_codes``:
    the checked expansion of a pcaK-ec stream)."""
    if code.entropy:
        return basis.reconstruct(_ec_coefficients(ec_codes, M, code.k), t["norms"])
    if code.bits == 16:
        return t["tokens"].float()
    if not code.k:
        return dequantize_int8(t["tokens"], t["scales"])
    q = t["codes"] if code.bits == 8 else unpack_int4(t["codes"], code.k)
    return basis.reconstruct(dequantize_int8(q, t["scales"]), t["norms"])




def code_span_factors(gamma: torch.Tensor, code: TokenCode, basis: TokenBasis) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (C, k), B (k, C)) with A·B = diag(γ)·P·diag(γ)⁻¹, P = decoderᵀ·encoder the code's projection of a
    layer-normalized token: a change Δ of a bridge's token projection (which reads γ ⊙ x̂ + β) written as
    Δ·A·B reads a real token x̂ exactly as Δ reads its rebuilt form r̂ = mean + P(x̂ − mean), up to a
    constant the bias absorbs (rounding aside).

    Why: the student trains on rebuilt uploads but the device serves real tokens. A free change also
    answers the part of a real token the code does not carry (measured: 22 % of its effect, ~1 point of
    online accuracy); confined to the span, it answers only what it can have been trained on, and the
    rest of the token reaches the bridge as the source model reads it. γ is kept away from 0 (≥ 1e-3)."""
    k = code.k
    g = gamma.float()
    g = torch.where(g.abs() < 1e-3, torch.where(g < 0, -1e-3, 1e-3).to(g), g)
    return g[:, None] * basis.decoder[:k].T, basis.encoder[:k] / g[None, :]
