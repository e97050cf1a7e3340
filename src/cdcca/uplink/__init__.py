"""UTS uplink (Uncertainty-guided Token Sampling): which samples leave the device, and which of their tokens.

The device answers every request itself. For a round of requests, UTS

1. scores each answer's *sample uncertainty* (:data:`SAMPLE_SCORERS`, ``Answer -> float``, higher =
   more uncertain; or the opt-in two-view :func:`view_uncertainty`) and picks the samples to upload
   (:func:`select_samples`: a threshold, the ``k`` most uncertain, or as many of the most uncertain
   as fit a byte budget);
2. scores each uploaded sample's 49 visual tokens (:data:`TOKEN_SCORERS`, ``(B, 49, C) -> (B, 49)``)
   and keeps a fraction of them (:func:`select_tokens`);
3. quantizes the kept tokens (int8 with a per-token fp16 absmax scale, or fp16) and packs them, with
   the question, the device's answer and its confidence, into one ``wire`` packet of kind
   ``"uplink"`` (:func:`build_uplink`). The cloud rebuilds exactly what its bridge needs with
   :func:`decode_uplink`.

The raw image never leaves the device unless :attr:`UTSConfig.allow_image` is set.
Everything here is a pure function over tensors and dataclasses: no SQLite, no network.

The package owns that whole device-to-cloud path: :mod:`~cdcca.uplink.config` (constants,
:class:`UTSConfig`), :mod:`~cdcca.uplink.samples` (sample scorers and selection),
:mod:`~cdcca.uplink.tokens` (token statistics, scorers and selection), :mod:`~cdcca.uplink.packet`
(the packet and its decoder) and :mod:`~cdcca.uplink.plan` (one round on the device).

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

from cdcca.metrics import auroc
from cdcca.uplink.config import (
    DIRECTIONS,
    FILLS,
    MAX_DENSE_ELEMENTS,
    N_TOKENS,
    PNG_SIGNATURE,
    SAMPLE_SCORER_NAMES,
    SELECTIONS,
    TOKEN_DIM,
    TOKEN_DTYPES,
    TOKEN_SCORER_NAMES,
    TOKEN_STATS_PATH,
    UPLINK_FORMAT,
    UTSConfig,
)
from cdcca.uplink.packet import (
    PACKET_OVERHEAD,
    UplinkBatch,
    UplinkSample,
    build_uplink,
    decode_uplink,
    dequantize_int8,
    quantize_int8,
    sample_cost,
)
from cdcca.uplink.plan import plan_uplink, png_bytes
from cdcca.uplink.samples import (
    SAMPLE_SCORERS,
    sample_uncertainty,
    score_confidence,
    score_entropy,
    score_margin,
    score_mc_disagreement,
    score_mc_entropy,
    select_samples,
    view_uncertainty,
)
from cdcca.uplink.tokens import (
    TOKEN_SCORERS,
    TokenStats,
    build_token_stats,
    collect_token_stats,
    default_token_stats,
    n_keep,
    score_energy,
    score_mc_dropout,
    score_ood,
    score_random,
    score_tokens,
    select_tokens,
)

__all__ = [
    "DIRECTIONS", "FILLS", "MAX_DENSE_ELEMENTS", "N_TOKENS", "PACKET_OVERHEAD", "PNG_SIGNATURE", "SAMPLE_SCORERS",
    "SAMPLE_SCORER_NAMES", "SELECTIONS", "TOKEN_DIM", "TOKEN_DTYPES", "TOKEN_SCORERS", "TOKEN_SCORER_NAMES",
    "TOKEN_STATS_PATH", "UPLINK_FORMAT", "TokenStats", "UTSConfig", "UplinkBatch", "UplinkSample", "auroc",
    "build_token_stats", "build_uplink", "collect_token_stats", "decode_uplink", "default_token_stats",
    "dequantize_int8", "n_keep", "plan_uplink", "png_bytes", "quantize_int8", "sample_cost", "sample_uncertainty",
    "score_confidence", "score_energy", "score_entropy", "score_margin", "score_mc_disagreement", "score_mc_dropout",
    "score_mc_entropy", "score_ood", "score_random", "score_tokens", "select_samples", "select_tokens",
    "view_uncertainty",
]
