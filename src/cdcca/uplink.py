"""UTS uplink (Uncertainty-guided Token Sampling): which samples leave the device, and which of their tokens.

The device answers every request itself. For a round of requests, UTS

1. scores each answer's *sample uncertainty* (:data:`SAMPLE_SCORERS`, ``Answer -> float``, higher =
   more uncertain; or the opt-in two-view :func:`view_uncertainty`) and picks the samples to upload (:func:`select_samples`: a threshold, the ``k``
   most uncertain, or as many of the most uncertain as fit a byte budget);
2. scores each uploaded sample's 49 visual tokens (:data:`TOKEN_SCORERS`, ``(B, 49, C) -> (B, 49)``)
   and keeps a fraction of them (:func:`select_tokens`);
3. quantizes the kept tokens (int8 with a per-token fp16 absmax scale, or fp16) and packs them, with
   the question, the device's answer and its confidence, into one ``wire`` packet of kind
   ``"uplink"`` (:func:`build_uplink`). The cloud rebuilds exactly what its bridge needs with
   :func:`decode_uplink`.

The raw image never leaves the device unless :attr:`UTSConfig.allow_image` is set.
Everything here is a pure function over tensors and dataclasses: no SQLite, no network.

Packet layout (``wire`` kind ``"uplink"``; N samples, M = total kept tokens, P = 49, C = 1280)::

    tokens       int8 (M, C) | float16 (M, C)   kept tokens, sample after sample, positions ascending
    scales       float16 (M,)                   per-token absmax / 127 (int8 only)
    positions    uint8 (M,)                     grid position 0..P-1 of every kept token
    counts       int32 (N,)                     kept tokens per sample (1..P, sums to M)
    confidence   float32 (N,)                   the device's Π max-prob confidence
    uncertainty  float32 (N,)                   the sample scorer's value that selected it
    text         uint8 (L,)                     UTF-8 JSON [{"id", "q", "a", "mc"}, ...] (one per sample)
    image_png    uint8 (K,)   [allow_image]     concatenated PNG files
    image_sizes  int32 (N,)   [allow_image]     bytes of each sample's PNG (0 = none)
    meta: uts.format, device_id, adapter_version, n_samples, n_tokens, token_dim, token_dtype,
          fill, sample_scorer, token_scorer, keep_ratio, direction
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cdcca import wire
from cdcca.model.answer import Answer
from cdcca.wire import PacketError

UPLINK_FORMAT = "1"
N_TOKENS = 49
TOKEN_DIM = 1280
FULL_TOKEN_BYTES = N_TOKENS * TOKEN_DIM * 4          # one request's tokens as fp32: 250,880 B
MAX_DENSE_ELEMENTS = 2**27                            # N·P·C floats a decoded packet may expand to (512 MiB)
TOKEN_STATS_PATH = Path(__file__).resolve().parent / "weights" / "token_stats.safetensors"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SAMPLE_SCORER_NAMES = ("confidence", "entropy", "margin", "mc_disagreement", "mc_entropy", "view_consistency")
SELECTIONS = ("threshold", "budget", "bytes")
TOKEN_SCORER_NAMES = ("ood", "mc_dropout", "energy", "random")
DIRECTIONS = ("most", "least")
FILLS = ("mask", "mean", "zeros")
TOKEN_DTYPES = ("int8", "fp16")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class UTSConfig:
    """How the device decides what to upload. Every field is validated in ``__post_init__``.

    Attributes:
        sample_scorer: Uncertainty of one answer (higher = upload sooner). ``"confidence"``: 1 − Π_t
            max_v p_t(v), the authors' rule; ``"entropy"``: mean per-step token entropy (nats);
            ``"margin"``: 1 − (p(top1) − p(top2)) at the first step; ``"mc_disagreement"`` (default):
            1 − max candidate probability — the device's own probability that its multiple-choice
            answer is wrong, which is exactly the event the cloud can correct; ``"mc_entropy"``: the
            candidate distribution's entropy normalized by log(#candidates); ``"view_consistency"``
            (opt-in, needs the device ``model`` and ``prompter`` in :func:`plan_uplink`): a second MC
            view with the most out-of-distribution half of the tokens dropped, combined with
            ``mc_disagreement`` (:func:`view_uncertainty`). It catches confidently wrong answers the
            answer-only scorers miss, at the price of one extra LLM prefill per request.
        temperature: Softmax temperature the caller passes to ``answer_batch`` when it computes the
            answers that are scored. The authors use 0.1, which pushes Π max-prob towards 1 for
            almost every answer (the ``confidence`` scorer then barely separates); 1.0 keeps it
            informative. It does not change the greedy answer or ``mc_probs``.
        selection: Which samples leave the device in a round. ``"threshold"``: every sample whose
            uncertainty exceeds ``threshold``; ``"budget"``: the ``budget`` most uncertain;
            ``"bytes"``: the most uncertain samples, in order, while the packet fits ``byte_budget``.
        threshold: Uncertainty above which a sample is uploaded (``selection="threshold"``). The
            device's candidate softmax is sharp: on the default shift stream 0.01 uploads about a
            quarter of the requests and catches about half of the wrong answers (0.5 uploads < 1 %).
        budget: Samples uploaded per round (``selection="budget"``).
        byte_budget: Packet bytes per round (``selection="bytes"``).
        token_scorer: Per-token uncertainty over the 49 visual tokens. ``"ood"``: diagonal
            Mahalanobis distance to the position's clean source statistics (:class:`TokenStats`);
            ``"mc_dropout"``: disagreement of T dropout passes through the bridge's token pathway;
            ``"energy"``: the token's L2 norm (what the authors' code effectively ranks by);
            ``"random"``: seeded uniform.
        keep_ratio: Fraction of the 49 tokens uploaded per sample (0.5 was the paper's best); at
            least one token is always kept.
        direction: ``"most"`` keeps the highest-scoring (most uncertain) tokens, ``"least"`` the lowest.
        fill: How the cloud fills the dropped slots. ``"mask"`` (default): masked out of its bridge's
            cross-attention; ``"mean"``: the position's clean source mean (needs :class:`TokenStats`);
            ``"zeros"``: zero vectors.
        token_dtype: ``"int8"`` (per-token absmax scale in fp16, ~1 byte/channel) or ``"fp16"``.
        mc_dropout_passes: T, stochastic passes of the ``mc_dropout`` scorer.
        mc_dropout_p: Dropout probability of the ``mc_dropout`` scorer.
        ood_floor: Variance floor of the ``ood`` scorer, relative to the mean source variance (many
            channels of the ReLU6 feature map never fire on clean data; without a floor one stray
            activation would dominate a token's score).
        seed: Seed of the ``random`` and ``mc_dropout`` scorers (deterministic uploads).
        allow_image: Also upload each sample's PNG. Off by default: the raw image never leaves the
            device unless this is set explicitly.
        skip_top: Share of a round's requests, the most uncertain ones, that are never uploaded
            (0 = the paper's policy: upload the most uncertain). CEMA (ICLR 2024) skips the samples
            so uncertain that neither model can answer them; > 0 makes UTS upload a band below them.
    """

    sample_scorer: str = "mc_disagreement"
    temperature: float = 1.0
    selection: str = "threshold"
    threshold: float = 0.01
    budget: int = 8
    byte_budget: int = 256 * 1024
    token_scorer: str = "ood"
    keep_ratio: float = 0.5
    direction: str = "most"
    fill: str = "mask"
    token_dtype: str = "int8"
    mc_dropout_passes: int = 8
    mc_dropout_p: float = 0.1
    ood_floor: float = 0.01
    seed: int = 0
    allow_image: bool = False
    skip_top: float = 0.0

    def __post_init__(self):
        def choice(name: str, options: Sequence[str]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise ValueError(f"UTSConfig.{name} must be one of {', '.join(options)}; got {value!r}")

        def number(name: str, ok: Callable[[float], bool], rule: str, kind: type = float) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
                    or not math.isfinite(value) or not ok(value):
                raise ValueError(f"UTSConfig.{name} must be {rule}; got {value!r}")

        choice("sample_scorer", SAMPLE_SCORER_NAMES)
        choice("selection", SELECTIONS)
        choice("token_scorer", TOKEN_SCORER_NAMES)
        choice("direction", DIRECTIONS)
        choice("fill", FILLS)
        choice("token_dtype", TOKEN_DTYPES)
        number("temperature", lambda v: v > 0, "a positive number")
        number("threshold", lambda v: True, "a finite number")
        number("budget", lambda v: v >= 0, "an integer ≥ 0", int)
        number("byte_budget", lambda v: v >= 0, "an integer ≥ 0", int)
        number("keep_ratio", lambda v: 0 < v <= 1, "in (0, 1]")
        number("skip_top", lambda v: 0 <= v < 1, "in [0, 1)")
        number("mc_dropout_passes", lambda v: v >= 2, "an integer ≥ 2", int)
        number("mc_dropout_p", lambda v: 0 < v < 1, "in (0, 1)")
        number("ood_floor", lambda v: v > 0, "a positive number")
        number("seed", lambda v: True, "an integer", int)
        if not isinstance(self.allow_image, bool):
            raise ValueError(f"UTSConfig.allow_image must be True or False; got {self.allow_image!r}")


# ----------------------------------------------------------------------------------------------
# sample scorers: Answer -> uncertainty (higher = more uncertain)
# ----------------------------------------------------------------------------------------------
def score_confidence(a: Answer) -> float:
    """1 − Π_t max_v p_t(v): the authors' rule (their confidence is the product of step max-probs)."""
    return 1.0 - float(a.confidence)


def score_entropy(a: Answer) -> float:
    """Mean per-step token entropy of the generated answer, in nats (0 for an empty answer)."""
    return float(np.mean(a.entropies)) if a.entropies else 0.0


def score_margin(a: Answer) -> float:
    """1 − (p(top1) − p(top2)) at the first answer step."""
    return 1.0 - float(a.margin)


def score_mc_disagreement(a: Answer) -> float:
    """1 − max candidate probability: the device's own probability that its MC answer is wrong.

    The softmax over the 13 candidates' first tokens ignores probability mass on tokens that are no
    answer at all (which dominates Π max-prob on a shifted input), so it measures doubt *between
    answers* — the thing the cloud can fix.
    """
    return 1.0 - max(a.mc_probs) if a.mc_probs else 1.0


def score_mc_entropy(a: Answer) -> float:
    """Entropy of the candidate distribution divided by log(#candidates), in [0, 1]."""
    p = np.asarray(a.mc_probs, dtype=np.float64)
    if p.size < 2:
        return 1.0
    return float(-(p * np.log(np.clip(p, 1e-12, None))).sum() / math.log(p.size))


SAMPLE_SCORERS: dict[str, Callable[[Answer], float]] = {
    "confidence": score_confidence,
    "entropy": score_entropy,
    "margin": score_margin,
    "mc_disagreement": score_mc_disagreement,
    "mc_entropy": score_mc_entropy,
}


def sample_uncertainty(answers: Sequence[Answer], scorer: str = "mc_disagreement") -> list[float]:
    """One uncertainty per answer from an answer-only scorer of :data:`SAMPLE_SCORERS`."""
    if scorer == "view_consistency":
        raise ValueError("sample scorer 'view_consistency' needs the device model: use view_uncertainty(...) "
                         "or pass model= and prompter= to plan_uplink")
    if scorer not in SAMPLE_SCORERS:
        raise ValueError(f"unknown sample scorer {scorer!r}; choose from {', '.join(SAMPLE_SCORERS)}")
    return [SAMPLE_SCORERS[scorer](a) for a in answers]


@torch.no_grad()
def view_uncertainty(model: torch.nn.Module, prompter, tokens: torch.Tensor, questions: Sequence[str],
                     answers: Sequence[Answer], *, stats: TokenStats | None = None, keep_ratio: float = 0.5,
                     floor: float = 0.01, batch_size: int = 64) -> list[float]:
    """Two-view uncertainty: ``sqrt((1 − p1) · (1 − p_view))`` ∈ [0, 1].

    ``p1`` is the device's candidate probability of its own MC answer; ``p_view`` is the probability
    the device gives that same answer when it sees only the ``keep_ratio`` *least* out-of-distribution
    tokens (``ood`` scorer). An answer that leans on the shifted tokens changes under that view even
    when the device was sure of it — the confidently wrong answers (e.g. under pixelation) that no
    answer-only score can flag. Costs one extra MC forward (no generation) per request.
    """
    from cdcca.model.answer import mc_predict

    x = _check_tokens(tokens)
    keep = select_tokens(score_ood(x, stats=stats, floor=floor), keep_ratio, "least")
    out = []
    for s in range(0, len(questions), batch_size):
        probs = mc_predict(model, prompter, x[s:s + batch_size], list(questions[s:s + batch_size]),
                           keep=keep[s:s + batch_size])
        for a, p in zip(answers[s:s + batch_size], probs):
            p_view = float(p[prompter.candidates.index(a.mc)]) if a.mc in prompter.candidates else 0.0
            out.append(math.sqrt(max(0.0, score_mc_disagreement(a)) * max(0.0, 1.0 - p_view)))
    return out


def _nan_last_key(u: float) -> float:
    return math.inf if math.isnan(u) else u   # a NaN score counts as maximally uncertain


def select_samples(uncertainty: Sequence[float], cfg: UTSConfig, *,
                   costs: Sequence[int] | None = None) -> list[int]:
    """Indices (ascending) of the samples to upload this round.

    ``threshold``: uncertainty > cfg.threshold. ``budget``: the cfg.budget most uncertain (ties broken
    by index). ``bytes``: most uncertain first, as long as the running total of ``costs`` (bytes each
    sample adds to the packet, see :func:`sample_cost`) plus :data:`PACKET_OVERHEAD` fits
    cfg.byte_budget. NaN uncertainty counts as most uncertain.
    """
    u = [_nan_last_key(float(x)) for x in uncertainty]
    order = sorted(range(len(u)), key=lambda i: (-u[i], i))
    order = order[int(round(cfg.skip_top * len(u))):]        # the band policy leaves the most uncertain out
    if cfg.selection == "threshold":
        picked = [i for i in order if u[i] > cfg.threshold]
    elif cfg.selection == "budget":
        picked = order[: cfg.budget]
    else:
        if costs is None or len(costs) != len(u):
            raise ValueError("selection='bytes' needs one cost per sample (see sample_cost)")
        picked, total = [], PACKET_OVERHEAD
        for i in order:
            if total + costs[i] > cfg.byte_budget:
                break
            picked.append(i)
            total += costs[i]
    return sorted(picked)


# ----------------------------------------------------------------------------------------------
# token statistics (source domain) for the ood scorer
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenStats:
    """Per-position mean and variance (P, C) of clean source-domain visual tokens."""

    mean: torch.Tensor
    var: torch.Tensor
    n: int = 0

    def __post_init__(self):
        self.mean, self.var = self.mean.float(), self.var.float()
        if self.mean.ndim != 2 or self.mean.shape != self.var.shape:
            raise ValueError(f"TokenStats needs mean and var of one (P, C) shape; got "
                             f"{tuple(self.mean.shape)} and {tuple(self.var.shape)}")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.var).all()) or (self.var < 0).any():
            raise ValueError("TokenStats mean/var must be finite and var ≥ 0")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mean.shape)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as fp16 safetensors (~250 KB for 49 × 1280), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"mean": self.mean.half().contiguous(), "var": self.var.half().contiguous()}, str(tmp),
                  metadata={"format": "cdcca.token_stats/1", "n": str(int(self.n))})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "TokenStats":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                mean, var = f.get_tensor("mean"), f.get_tensor("var")
            return cls(mean, var, int(meta.get("n", 0)))
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets one clear message
            raise ValueError(f"{path} is not a token-statistics file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild it with "
                             f"cdcca.uplink.build_token_stats()") from None


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
    return TokenStats(mean.float(), var.float(), n)


def build_token_stats(out: str | os.PathLike[str] | None = None) -> Path:
    """Compute the source statistics from the cached clean easy-VQA *train* features and write them
    (default: the packaged ``cdcca/weights/token_stats.safetensors``)."""
    from cdcca.model.encoder import cached_features

    stats = collect_token_stats(cached_features("train"))
    path = stats.save(out or TOKEN_STATS_PATH)
    default_token_stats.cache_clear()
    return path


@lru_cache(maxsize=1)
def default_token_stats() -> TokenStats:
    """The packaged source statistics (49 × 1280)."""
    from cdcca.assets import AssetError

    if not TOKEN_STATS_PATH.is_file():
        raise AssetError(f"token statistics not found at {TOKEN_STATS_PATH}; build them with: "
                         "python -c 'from cdcca.uplink import build_token_stats; build_token_stats()'")
    return TokenStats.load(TOKEN_STATS_PATH)


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
        mask = torch.rand((passes, B, P, d), generator=g) >= p
        z = (h * mask / (1 - p)) @ w_v.T + b_v                                    # (T, B, P, d)
    else:
        w1, w2 = _random_feature_net(C, seed)
        h = F.gelu(F.layer_norm(x, (C,)) @ w1)                                   # (B, P, 64)
        mask = torch.rand((passes, *h.shape), generator=g) >= p
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


# ----------------------------------------------------------------------------------------------
# the uplink packet
# ----------------------------------------------------------------------------------------------
@dataclass
class UplinkSample:
    """One request the device wants the cloud to see. ``tokens`` (P, C) are the device's visual
    tokens; only the positions where ``keep`` is True are uploaded (None = all)."""

    sample_id: str
    tokens: torch.Tensor
    question: str
    answer: str
    confidence: float
    uncertainty: float = float("nan")
    keep: torch.Tensor | None = None
    mc: str = ""
    image_png: bytes | None = None


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
    images: list[bytes | None] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0

    def __len__(self) -> int:
        return len(self.sample_ids)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) float → int8 (M, C) and fp16 per-row scales with x ≈ q · scale (symmetric absmax).

    The error per value is at most scale / 2, with scale ≥ absmax / 127 (equal up to fp16 rounding)."""
    x = x.float()
    target = x.abs().amax(-1) / 127.0
    scale = target.half()
    # round the fp16 scale up, never down, so |x| / scale ≤ 127 and no value is clipped
    scale = torch.where(scale.float() < target, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    if not torch.isfinite(scale).all():
        raise ValueError("token values are too large for an fp16 int8 scale (|x| > 8.3e6)")
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    q = torch.where(scale[:, None] > 0, (x / s).round().clamp(-127, 127), torch.zeros_like(x))
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def _text_entry(s: UplinkSample) -> dict[str, str]:
    return {"id": s.sample_id, "q": s.question, "a": s.answer, "mc": s.mc}


def _utf8(obj) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"uplink text must be valid UTF-8 (no lone surrogates): {exc}") from None


PACKET_OVERHEAD = 2048   # bytes of header, metadata and alignment a packet adds (an upper bound)


def sample_cost(n_kept: int, token_dim: int = TOKEN_DIM, token_dtype: str = "int8", text_bytes: int = 64,
                image_bytes: int = 0) -> int:
    """Bytes one sample adds to an uplink packet (tokens, scales, positions, numbers, its text)."""
    per_token = token_dim * (1 if token_dtype == "int8" else 2) + (2 if token_dtype == "int8" else 0) + 1
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


def build_uplink(samples: Sequence[UplinkSample], cfg: UTSConfig, *, device_id: str, adapter_version: str) -> bytes:
    """Pack the samples' kept tokens, quantized per cfg.token_dtype, into one ``uplink`` packet.

    At the default setting a sample costs ~31 KB, so one packet holds up to ~2,000 samples before the
    wire's 64 MiB limit; send larger backlogs in several packets (``Outbox.pending(limit)``).
    """
    if not samples:
        raise ValueError("an uplink packet needs at least one sample")
    P, C = tuple(samples[0].tokens.shape) if samples[0].tokens.ndim == 2 else (None, None)
    if P is None or not 1 <= P <= 256 or C < 1:
        raise ValueError(f"sample tokens must be (P, C) with 1 ≤ P ≤ 256; got {tuple(samples[0].tokens.shape)}")
    ids = [s.sample_id for s in samples]
    if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique non-empty strings")
    rows, positions, counts = [], [], []
    for s in samples:
        if tuple(s.tokens.shape) != (P, C):
            raise ValueError(f"sample {s.sample_id!r} has tokens {tuple(s.tokens.shape)}, expected {(P, C)}")
        keep = _kept(s, P)
        pos = keep.nonzero().flatten()
        rows.append(s.tokens[pos].float())
        positions.append(pos)
        counts.append(len(pos))
    flat = torch.cat(rows)
    if not torch.isfinite(flat).all():
        raise ValueError("uplink tokens must be finite")
    tensors: dict[str, torch.Tensor] = {
        "positions": torch.cat(positions).to(torch.uint8),
        "counts": torch.tensor(counts, dtype=torch.int32),
        "confidence": torch.tensor([float(s.confidence) for s in samples], dtype=torch.float32),
        "uncertainty": torch.tensor([float(s.uncertainty) for s in samples], dtype=torch.float32),
        "text": torch.frombuffer(bytearray(_utf8([_text_entry(s) for s in samples])), dtype=torch.uint8),
    }
    if cfg.token_dtype == "int8":
        tensors["tokens"], tensors["scales"] = quantize_int8(flat)
    else:
        if flat.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError("token values overflow fp16; use token_dtype='int8'")
        tensors["tokens"] = flat.half()
    if cfg.allow_image:
        images = [bytes(s.image_png or b"") for s in samples]
        for s, img in zip(samples, images):
            if img and not img.startswith(PNG_SIGNATURE):
                raise ValueError(f"sample {s.sample_id!r}: image_png is not a PNG file")
        blob = b"".join(images)
        tensors["image_png"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
        tensors["image_sizes"] = torch.tensor([len(i) for i in images], dtype=torch.int32)
    meta = {
        "uts.format": UPLINK_FORMAT, "device_id": str(device_id), "adapter_version": str(adapter_version),
        "n_samples": str(len(samples)), "n_tokens": str(P), "token_dim": str(C),
        "token_dtype": cfg.token_dtype, "fill": cfg.fill, "sample_scorer": cfg.sample_scorer,
        "token_scorer": cfg.token_scorer, "keep_ratio": repr(float(cfg.keep_ratio)), "direction": cfg.direction,
    }
    data = wire.encode("uplink", tensors, meta)
    if len(data) > wire.DEFAULT_LIMITS.max_bytes:
        raise ValueError(f"uplink packet would be {len(data)} bytes, over the wire limit of "
                         f"{wire.DEFAULT_LIMITS.max_bytes}; send the samples in several packets")
    return data


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise PacketError(f"uplink packet: {message}")


def _int_meta(meta: dict[str, str], key: str, lo: int, hi: int) -> int:
    raw = meta.get(key)
    _need(raw is not None, f"metadata lacks {key!r}")
    try:
        value = int(raw)
    except ValueError:
        value = None
    _need(value is not None and str(value) == raw and lo <= value <= hi, f"{key}={raw[:40]!r} must be an integer in {lo}..{hi}")
    return value


def _tensor(t: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    _need(name in t, f"tensor {name!r} is missing")
    x = t[name]
    _need(x.dtype == dtype, f"tensor {name!r} is {x.dtype}, expected {dtype}")
    _need(tuple(x.shape) == shape, f"tensor {name!r} has shape {tuple(x.shape)}, expected {shape}")
    return x


def decode_uplink(data: bytes, *, fill: str | None = None, stats: TokenStats | None = None) -> UplinkBatch:
    """Validate an uplink packet and rebuild dense (N, P, C) float32 tokens plus the bridge's keep mask.

    ``fill`` overrides the packet's fill mode; ``"mean"`` uses ``stats`` (default: the packaged
    source statistics). Any inconsistency raises :class:`wire.PacketError`.
    """
    pkt = wire.decode(data, expect_kind="uplink")
    meta, t = pkt.meta, pkt.tensors
    _need(meta.get("uts.format") == UPLINK_FORMAT,
          f"uts.format {meta.get('uts.format', '')[:20]!r} is not {UPLINK_FORMAT!r}; upgrade cdcca on this side")
    N = _int_meta(meta, "n_samples", 1, 2**20)
    P = _int_meta(meta, "n_tokens", 1, 256)
    C = _int_meta(meta, "token_dim", 1, 2**20)
    _need(N * P * C <= MAX_DENSE_ELEMENTS, f"{N}×{P}×{C} tokens would expand beyond {MAX_DENSE_ELEMENTS} floats")
    token_dtype = meta.get("token_dtype")
    _need(token_dtype in TOKEN_DTYPES, f"token_dtype {str(token_dtype)[:20]!r} is not one of {TOKEN_DTYPES}")
    fill = fill or meta.get("fill")
    _need(fill in FILLS, f"fill {str(fill)[:20]!r} is not one of {FILLS}")
    for key in ("device_id", "adapter_version"):
        _need(key in meta, f"metadata lacks {key!r}")
    allowed = {"tokens", "positions", "counts", "confidence", "uncertainty", "text"}
    allowed |= {"scales"} if token_dtype == "int8" else set()
    allowed |= {"image_png", "image_sizes"} if "image_sizes" in t else set()
    _need(set(t) == allowed, f"tensors {sorted(t)} do not match the layout {sorted(allowed)}")

    counts = _tensor(t, "counts", torch.int32, (N,)).long()
    _need(bool(((counts >= 1) & (counts <= P)).all()), f"every sample must carry 1..{P} tokens")
    M = int(counts.sum())
    positions = _tensor(t, "positions", torch.uint8, (M,)).long()
    q = _tensor(t, "tokens", torch.int8 if token_dtype == "int8" else torch.float16, (M, C))
    if token_dtype == "int8":
        scales = _tensor(t, "scales", torch.float16, (M,))
        _need(bool(torch.isfinite(scales).all() and (scales >= 0).all()), "scales must be finite and ≥ 0")
        rows = dequantize_int8(q, scales)
    else:
        rows = q.float()
        _need(bool(torch.isfinite(rows).all()), "tokens must be finite")
    conf = _tensor(t, "confidence", torch.float32, (N,))
    unc = _tensor(t, "uncertainty", torch.float32, (N,))

    _need(bool((positions < P).all()), f"a token position is ≥ n_tokens={P}")
    sample_of = torch.repeat_interleave(torch.arange(N), counts)
    if M > 1:   # within a sample, positions strictly ascending (hence distinct)
        step = positions[1:] - positions[:-1]
        same = sample_of[1:] == sample_of[:-1]
        _need(bool((step[same] > 0).all()), "positions within a sample must be strictly ascending")

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
    return UplinkBatch(
        tokens=dense, keep=keep, sent=sent, questions=[e["q"] for e in entries], answers=[e["a"] for e in entries],
        mc=[e["mc"] for e in entries], confidences=conf.tolist(), uncertainties=unc.tolist(), sample_ids=ids,
        device_id=meta["device_id"], adapter_version=meta["adapter_version"], fill=fill, token_dtype=token_dtype,
        images=images, meta=dict(meta), nbytes=len(data))


# ----------------------------------------------------------------------------------------------
# one UTS round on the device
# ----------------------------------------------------------------------------------------------
def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image as PNG file bytes (only ever uploaded when allow_image=True)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def plan_uplink(tokens: torch.Tensor, questions: Sequence[str], answers: Sequence[Answer],
                sample_ids: Sequence[str], cfg: UTSConfig, *, stats: TokenStats | None = None,
                bridge: torch.nn.Module | None = None, images: Sequence[np.ndarray] | None = None,
                uncertainty: Sequence[float] | None = None, model: torch.nn.Module | None = None,
                prompter=None) -> list[UplinkSample]:
    """Run UTS over one round of answered requests: score and select samples, then score and select
    the tokens of the selected ones. Confident samples stay on the device (they are not returned).

    tokens (B, P, C); ``uncertainty`` may be passed when already computed (else cfg.sample_scorer;
    ``view_consistency`` needs the device ``model`` and ``prompter``). ``bridge`` defaults to the
    model's for the ``mc_dropout`` token scorer.
    """
    B = len(questions)
    if tokens.ndim != 3 or len(tokens) != B or len(answers) != B or len(sample_ids) != B:
        raise ValueError(f"need one token set, answer and id per question; got tokens {tuple(tokens.shape)}, "
                         f"{B} questions, {len(answers)} answers, {len(sample_ids)} ids")
    if bridge is None and model is not None:
        bridge = model.bridge
    if uncertainty is not None:
        u = list(uncertainty)
    elif cfg.sample_scorer == "view_consistency":
        if model is None or prompter is None:
            raise ValueError("sample_scorer='view_consistency' needs plan_uplink(..., model=device, prompter=prompter)")
        u = view_uncertainty(model, prompter, tokens, questions, answers, stats=stats, floor=cfg.ood_floor)
    else:
        u = sample_uncertainty(answers, cfg.sample_scorer)
    costs = None
    if cfg.selection == "bytes":
        k = n_keep(cfg.keep_ratio, tokens.shape[1])
        costs = [sample_cost(k, tokens.shape[2], cfg.token_dtype,
                             len(_utf8({"id": str(i), "q": q, "a": a.text, "mc": a.mc})) + 1)
                 for i, q, a in zip(sample_ids, questions, answers)]
    picked = select_samples(u, cfg, costs=costs)
    if not picked:
        return []
    sel = tokens[picked]
    keep = select_tokens(score_tokens(sel, cfg, stats=stats, bridge=bridge), cfg.keep_ratio, cfg.direction)
    out = []
    for j, i in enumerate(picked):
        img = png_bytes(images[i]) if cfg.allow_image and images is not None else None
        out.append(UplinkSample(str(sample_ids[i]), tokens[i], questions[i], answers[i].text,
                                float(answers[i].confidence), float(u[i]), keep[j], answers[i].mc, img))
    return out


# ----------------------------------------------------------------------------------------------
# evaluation helper
# ----------------------------------------------------------------------------------------------
def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for predicting ``labels`` (True = positive), ties
    counted half (Mann–Whitney U with average ranks). NaN when one class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
