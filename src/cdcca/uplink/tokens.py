"""Visual-token side of UTS: source-domain token statistics for the ``ood`` scorer, the token
scorers ``(B, P, C) -> (B, P)`` and the per-sample choice of which tokens to upload."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.nn import functional as F

from cdcca.assets import AssetError
from cdcca.atomic import write_safetensors
from cdcca.data.easyvqa import VQASet
from cdcca.data.features import cached_features
from cdcca.trained_pair import active
from cdcca.uplink.config import DIRECTIONS, N_TOKENS, TOKEN_STATS_PATH, UTSConfig


# ----------------------------------------------------------------------------------------------
# token statistics (source domain) for the ood scorer
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenStats:
    """Per-position mean and variance (P, C) of clean source-domain visual tokens."""

    mean: torch.Tensor
    var: torch.Tensor
    n: int = 0
    pooled: torch.Tensor | None = None     # (K, C) pooled tokens of K source images: the shift detector's first baseline

    def __post_init__(self):
        self.mean, self.var = self.mean.float(), self.var.float()
        if self.mean.ndim != 2 or self.mean.shape != self.var.shape:
            raise ValueError(f"TokenStats needs mean and var of one (P, C) shape; got "
                             f"{tuple(self.mean.shape)} and {tuple(self.var.shape)}")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.var).all()) or (self.var < 0).any():
            raise ValueError("TokenStats mean/var must be finite and var ≥ 0")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[1] != self.mean.shape[1]
                                        or not torch.isfinite(self.pooled).all()):
            raise ValueError(f"TokenStats pooled must be finite (K, {self.mean.shape[1]}); got {tuple(self.pooled.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mean.shape)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as fp16 safetensors (~250 KB for 49 × 1280), atomically."""

        path = Path(path)
        tensors = {"mean": self.mean.half(), "var": self.var.half()}
        if self.pooled is not None:
            tensors["pooled"] = self.pooled.half()
        write_safetensors(path, tensors, metadata={"format": "cdcca.token_stats/1", "n": str(int(self.n))})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStats:
        (mean, var, pooled), n = read_tensor_file(path, ("mean", "var", "pooled?"), "token-statistics",
                                                  "cdcca.uplink.build_token_stats()")
        return cls(mean, var, n, None if pooled is None else pooled.float())


def read_tensor_file(path: str | os.PathLike[str], names: tuple[str, ...], what: str,
                     rebuild: str) -> tuple[list[torch.Tensor], int]:
    """The named tensors and the ``n`` metadata of a shipped safetensors file (token statistics, the token
    basis); a name ending in ``?`` is optional (None when absent: files written before it). A missing file
    raises FileNotFoundError, a damaged one a one-line ValueError naming the fix."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            return [None if name.endswith("?") and name[:-1] not in keys else f.get_tensor(name.rstrip("?"))
                    for name in names], int(meta.get("n", 0))
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a {what} file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild it with {rebuild}") from None


SOURCE_POOLED = 160     # clean images whose pooled tokens seed the shift detector (its baseline's length)


@torch.no_grad()
def collect_token_stats(tokens: torch.Tensor, chunk: int = 256) -> TokenStats:
    """Per-position mean and (population) variance of (N, P, C) tokens, accumulated in float64."""
    if tokens.ndim != 3 or len(tokens) == 0:
        raise ValueError(f"tokens must be a non-empty (N, P, C) tensor, got {tuple(tokens.shape)}")
    s = torch.zeros(tokens.shape[1:], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for start in range(0, len(tokens), chunk):
        x = tokens[start:start + chunk].double()
        s += x.sum(0)
        s2 += (x * x).sum(0)
    n = len(tokens)
    mean = s / n
    var = (s2 / n - mean * mean).clamp_min(0)
    spread = torch.linspace(0, n - 1, min(n, SOURCE_POOLED)).round().long()     # images across the whole set
    return TokenStats(mean.float(), var.float(), n, tokens[spread].float().mean(1))


def build_token_stats(out: str | os.PathLike[str] | None = None, data: VQASet | None = None) -> Path:
    """Compute the source statistics from the cached clean features of a task's train images (default: the
    served pair's) and write them (default: that pair's ``token_stats.safetensors``)."""

    pair = active()
    stats = collect_token_stats(cached_features(data if data is not None else pair.task.split("train")))
    path = stats.save(out or pair.root / "token_stats.safetensors")
    _stats_of.cache_clear()
    return path


def default_token_stats() -> TokenStats:
    """The served pair's source statistics (49 × 1280)."""
    pair = active()
    path = pair.root / "token_stats.safetensors"
    if pair.shipped and not path.is_file():
        raise AssetError(f"token statistics not found at {TOKEN_STATS_PATH}; build them with: "
                         "python -c 'from cdcca.uplink import build_token_stats; build_token_stats()'")
    return _stats_of(pair.file(path.name))


@lru_cache(maxsize=4)
def _stats_of(path: Path) -> TokenStats:
    return TokenStats.load(path)


# ----------------------------------------------------------------------------------------------
# token scorers: (B, P, C) -> (B, P), higher = more uncertain / informative
# ----------------------------------------------------------------------------------------------
def _check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, P, C), got {tuple(tokens.shape)}")
    return tokens.float()


@torch.no_grad()
def score_ood(tokens: torch.Tensor, *, stats: TokenStats | None = None, floor: float = 0.01, **_) -> torch.Tensor:
    """Diagonal Mahalanobis distance to the position's source statistics, normalized by dim:
    ``mean_c (x_pc − μ_pc)² / (σ²_pc + floor · mean(σ²))``. Needs ``stats`` of shape (P, C)
    (default: the packaged ones)."""
    x = _check_tokens(tokens)
    stats = stats or default_token_stats()
    if stats.shape != tuple(x.shape[1:]):
        raise ValueError(f"token stats are {stats.shape}, tokens are {tuple(x.shape[1:])}")
    var = stats.var + floor * float(stats.var.mean().clamp_min(1e-12))
    return ((x - stats.mean) ** 2 / var).mean(-1)


def _random_feature_net(dim: int, seed: int, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7919)
    w1 = torch.randn(dim, width, generator=g) / math.sqrt(dim)
    w2 = torch.randn(width, width, generator=g) / math.sqrt(width)
    return w1, w2


@torch.no_grad()
def score_mc_dropout(tokens: torch.Tensor, *, bridge: torch.nn.Module | None = None, passes: int = 8,
                     p: float = 0.1, seed: int = 0, **_) -> torch.Tensor:
    """MC dropout through a network: how much T dropout passes disagree about a token's embedding.

    With the device's ``bridge`` the network is the bridge's own token pathway — LayerNorm, token
    projection + position embedding (the keys/values its cross-attention reads), dropout, then the
    first cross-attention block's value projection. Without one it is a fixed, seeded random-feature
    network (LayerNorm → C×64 → GELU → dropout → 64×64). Each pass's output z_t is unit-normalized;
    the score is the total variance of those unit vectors, ``1 − ‖mean_t z_t‖²`` ∈ [0, 1]: a token
    whose embedding hinges on a few channels swings under dropout, one with redundant evidence does not.

    Why not dropout on the token vector itself? With x̃ = m ⊙ x / (1 − p), m ~ Bernoulli(1 − p),
    Var[x̃_c] = p/(1 − p) · x_c², so the summed variance is p/(1 − p)·‖x‖²: a monotone function of the
    token's energy that ranks tokens exactly like :func:`score_energy`, however many passes are run.
    Here the LayerNorm removes the token's scale, so the score cannot be a function of its norm.
    """
    x = _check_tokens(tokens)
    B, P, C = x.shape
    g = torch.Generator().manual_seed(seed)
    if bridge is not None:
        if getattr(bridge.cfg, "token_dim", C) != C or getattr(bridge.cfg, "n_tokens", P) != P:
            raise ValueError(f"bridge expects tokens (*, {bridge.cfg.n_tokens}, {bridge.cfg.token_dim}), "
                             f"got {tuple(x.shape)}")
        h = bridge.token_proj(bridge.token_norm(x)) + bridge.pos                 # (B, P, d)
        d = h.shape[-1]
        ca = bridge.blocks[0].cross_attn
        w_v, b_v = ca.in_proj_weight[2 * d:], ca.in_proj_bias[2 * d:]
        mask = (torch.rand((passes, B, P, d), generator=g) >= p).to(h.device)    # seeded on the CPU: same on any device
        z = (h * mask / (1 - p)) @ w_v.T + b_v                                    # (T, B, P, d)
    else:
        w1, w2 = (w.to(x.device) for w in _random_feature_net(C, seed))
        h = F.gelu(F.layer_norm(x, (C,)) @ w1)                                   # (B, P, 64)
        mask = (torch.rand((passes, *h.shape), generator=g) >= p).to(h.device)
        z = (h * mask / (1 - p)) @ w2                                            # (T, B, P, 64)
    z = F.normalize(z, dim=-1)
    return (1.0 - z.mean(0).pow(2).sum(-1)).clamp_min(0)


@torch.no_grad()
def score_energy(tokens: torch.Tensor, **_) -> torch.Tensor:
    """The token's L2 norm — what ranking by dropout on the raw token effectively computes."""
    return _check_tokens(tokens).norm(dim=-1)


@torch.no_grad()
def score_random(tokens: torch.Tensor, *, seed: int = 0, **_) -> torch.Tensor:
    """Seeded uniform scores (the uninformed baseline)."""
    B, P = _check_tokens(tokens).shape[:2]
    return torch.rand((B, P), generator=torch.Generator().manual_seed(seed))


TOKEN_SCORERS: dict[str, Callable[..., torch.Tensor]] = {
    "ood": score_ood,
    "mc_dropout": score_mc_dropout,
    "energy": score_energy,
    "random": score_random,
}


def score_tokens(tokens: torch.Tensor, cfg: UTSConfig, *, stats: TokenStats | None = None,
                 bridge: torch.nn.Module | None = None) -> torch.Tensor:
    """(B, P) scores of cfg.token_scorer (stats for ``ood``, the device bridge for ``mc_dropout``)."""
    return TOKEN_SCORERS[cfg.token_scorer](tokens, stats=stats, bridge=bridge, passes=cfg.mc_dropout_passes,
                                           p=cfg.mc_dropout_p, seed=cfg.seed, floor=cfg.ood_floor)


def n_keep(keep_ratio: float, n_tokens: int = N_TOKENS) -> int:
    return max(1, min(n_tokens, round(keep_ratio * n_tokens)))


def select_tokens(scores: torch.Tensor, keep_ratio: float, direction: str = "most") -> torch.Tensor:
    """keep (B, P) bool: the round(keep_ratio · P) highest (``most``) or lowest (``least``) scores, ≥ 1."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, P), got {tuple(scores.shape)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    s = torch.nan_to_num(scores.float(), nan=math.inf)
    k = n_keep(keep_ratio, s.shape[1])
    idx = s.topk(k, dim=1, largest=direction == "most").indices
    return torch.zeros(s.shape, dtype=torch.bool).scatter_(1, idx, True)
