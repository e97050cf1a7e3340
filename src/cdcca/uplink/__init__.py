"""UTS uplink (Uncertainty-guided Token Sampling): which samples leave the device, and which of their tokens.

The device answers every request itself. For a round of requests, UTS

1. scores each answer's *sample uncertainty* (:data:`SAMPLE_SCORERS`, ``Answer -> float``, higher =
   more uncertain; or the opt-in two-view :func:`view_uncertainty`) and picks the samples to upload
   (:func:`select_samples`: a threshold, the ``k`` most uncertain, or as many of the most uncertain
   as fit a byte budget);
2. scores each uploaded sample's 49 visual tokens (:data:`TOKEN_SCORERS`, ``(B, 49, C) -> (B, 49)``)
   and keeps a fraction of them (:func:`select_tokens`);
3. codes the kept tokens (default ``pca256-ec``: 256 coefficients of a linear code both sides share,
   :mod:`~cdcca.uplink.codec`, rounded on one step and LZMA-coded, ~1.7 KiB an upload; or int8 / int4
   coefficients with a per-token scale, or every channel as int8 or fp16) and packs them, with the
   question, the device's answer and its confidence, into one ``wire`` packet of kind ``"uplink"``
   (:func:`build_uplink`). The cloud checks it (:func:`~cdcca.uplink.check.check_uplink`, no torch) and
   rebuilds exactly what its bridge needs with :func:`decode_uplink`.

The raw image never leaves the device unless :attr:`UTSConfig.allow_image` is set.
Everything here is a pure function over tensors and dataclasses: no SQLite, no network.

The package owns that whole device-to-cloud path: :mod:`~cdcca.uplink.config` (constants,
:class:`UTSConfig`), :mod:`~cdcca.uplink.samples` (sample scorers and selection),
:mod:`~cdcca.uplink.tokens` (token statistics, scorers and selection), :mod:`~cdcca.uplink.packet`
(the packet and its decoder), :mod:`~cdcca.uplink.codec` (the token codes and their basis) and :mod:`~cdcca.uplink.plan` (one round on the device).

Packet layout (``wire`` kind ``"uplink"``; N samples, M = total kept tokens, P = 49, C = 1280)::

    codes        int8 (M, K) | uint8 (M, K/2)   [pcaK-int8 | pcaK-int4] coefficients on the shared basis
                 | uint8 (B,)                   [pcaK-ec] raw LZMA2 stream of the (K, M) int8 codes
                                                round(c / EC_STEP), component-major
    tokens       int8 (M, C) | float16 (M, C)   [full-int8 | full-fp16] every channel
                                                (kept tokens, sample after sample, positions ascending)
    norms        float16 (M, 2)                 [pca codes] each token's channel mean and std
    scales       float16 (M,)                   per-token absmax / 127 (int8) or / 7 (int4); not for fp16, ec
    positions    uint8 (M,)                     grid position 0..P-1 of every kept token
    counts       int32 (N,)                     kept tokens per sample (1..P, sums to M)
    confidence   float32 (N,)                   the device's Π max-prob confidence
    uncertainty  float32 (N,)                   the sample scorer's value that selected it
    text         uint8 (L,)                     UTF-8 JSON [{"id", "q", "a", "mc"}, ...] (one per sample)
    image_png    uint8 (K,)   [allow_image]     concatenated PNG files
    image_sizes  int32 (N,)   [allow_image]     bytes of each sample's PNG (0 = none)
    meta: uts.format (2; 1 = full channels, no code named, still read), device_id, adapter_version,
          n_samples, n_tokens, token_dim, code, basis (digest of the basis, pca codes only), token_dtype,
          fill, sample_scorer, token_scorer, keep_ratio, direction
"""

from cdcca.lazy import lazy_exports

# name -> the module that defines it; loaded on first use (PEP 562), so that importing one submodule
# (the torch-free packet check of the cloud's inbox) does not import torch through the others
_EXPORTS: dict[str, tuple[str, ...]] = {
    "cdcca.metrics": (
        "auroc",
    ),
    "cdcca.uplink.codec": (
        "FULL_CODES", "TokenBasis", "TokenCode", "build_token_basis", "default_token_basis", "dequantize_int8",
        "fit_token_basis", "pack_int4", "parse_code", "quantize_codes", "quantize_int8", "unpack_int4",
    ),
    "cdcca.uplink.config": (
        "DIRECTIONS", "FILLS", "MAX_DENSE_ELEMENTS", "N_TOKENS", "PNG_SIGNATURE", "READABLE_FORMATS",
        "SAMPLE_SCORER_NAMES", "SELECTIONS", "TOKEN_BASIS_PATH", "TOKEN_DIM", "TOKEN_DTYPES", "TOKEN_SCORER_NAMES",
        "TOKEN_STATS_PATH", "UPLINK_FORMAT", "UTSConfig",
    ),
    "cdcca.uplink.packet": (
        "PACKET_OVERHEAD", "UplinkBatch", "UplinkSample", "build_uplink", "decode_uplink", "packet_code",
        "sample_cost",
    ),
    "cdcca.uplink.plan": (
        "frame_bytes", "plan_uplink", "png_bytes",
    ),
    "cdcca.uplink.samples": (
        "SAMPLE_SCORERS", "sample_uncertainty", "score_confidence", "score_entropy", "score_margin",
        "score_mc_disagreement", "score_mc_entropy", "select_samples", "view_uncertainty",
    ),
    "cdcca.uplink.tokens": (
        "TOKEN_SCORERS", "TokenStats", "build_token_stats", "collect_token_stats", "default_token_stats", "n_keep",
        "score_energy", "score_mc_dropout", "score_ood", "score_random", "score_tokens", "select_tokens",
    ),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
