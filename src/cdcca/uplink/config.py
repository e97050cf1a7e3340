"""UTS constants and :class:`UTSConfig`: the knobs every other uplink module reads, kept at the
bottom of the package so scorers, packet and planner can share them without import cycles."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

UPLINK_FORMAT = "3"                                   # 3: grids beyond 256 tokens (uint16 positions)
READABLE_FORMATS = ("1", "2", "3")                    # 2: the packet names its token code; 1: no code named
MAX_GRID = 65536                                      # tokens an image may have (uint16 positions)
N_TOKENS = 49
TOKEN_DIM = 1280
MAX_DENSE_ELEMENTS = 2**27                            # N·P·C floats a decoded packet may expand to (512 MiB)
TOKEN_STATS_PATH = Path(__file__).resolve().parent.parent / "weights" / "token_stats.safetensors"
TOKEN_BASIS_PATH = TOKEN_STATS_PATH.with_name("token_basis.safetensors")
PCA_CODE = re.compile(r"pca([1-9][0-9]{0,3})-(int8|int4|ec)")   # a basis code's name: components, then values
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SHIFT_SIGNALS = ("tokens", "uncertainty")     # what cdcca.runtime.shift can watch
SAMPLE_SCORER_NAMES = ("confidence", "entropy", "margin", "mc_disagreement", "mc_entropy", "view_consistency")
SELECTIONS = ("threshold", "budget", "bytes")
TOKEN_SCORER_NAMES = ("ood", "mc_dropout", "energy", "random")
DIRECTIONS = ("most", "least")
FILLS = ("mask", "mean", "zeros")
TOKEN_DTYPES = ("int8", "fp16")


@dataclass
class UTSConfig:
    """How the device decides what to upload; every field is validated in ``__post_init__``."""

    sample_scorer: str = field(default="mc_disagreement", metadata={"help": (
        "Uncertainty of one answer (higher = upload sooner). ``\"confidence\"``: 1 − Π_t max_v p_t(v), the "
        "authors' rule; ``\"entropy\"``: mean per-step token entropy (nats); ``\"margin\"``: 1 − (p(top1) − "
        "p(top2)) at the first step; ``\"mc_disagreement\"`` (default): 1 − max candidate probability — the "
        "device's own probability that its multiple-choice answer is wrong, which is exactly the event the "
        "cloud can correct; ``\"mc_entropy\"``: the candidate distribution's entropy normalized by "
        "log(#candidates); ``\"view_consistency\"`` (opt-in, needs the device ``model`` and ``prompter`` in "
        ":func:`plan_uplink`): a second MC view with the most out-of-distribution half of the tokens dropped,"
        " combined with ``mc_disagreement`` (:func:`view_uncertainty`). It catches confidently wrong answers "
        "the answer-only scorers miss, at the price of one extra LLM prefill per request.")})
    temperature: float = field(default=1.0, metadata={"help": (
        "Softmax temperature the caller passes to ``answer_batch`` when it computes the answers that are "
        "scored. The authors use 0.1, which pushes Π max-prob towards 1 for almost every answer (the "
        "``confidence`` scorer then barely separates); 1.0 keeps it informative. It does not change the "
        "greedy answer or ``mc_probs``.")})
    selection: str = field(default="budget", metadata={"help": (
        "Which samples leave the device in a round. ``\"threshold\"``: every sample whose uncertainty exceeds"
        " ``threshold``; ``\"budget\"`` (default): the ``budget`` most uncertain; ``\"bytes\"``: the most uncertain "
        "samples, in order, while the packet fits ``byte_budget``.")})
    threshold: float = field(default=0.01, metadata={"help": (
        "Uncertainty above which a sample is uploaded (``selection=\"threshold\"``). The device's candidate "
        "softmax is sharp: on the default shift stream 0.01 uploads about a quarter of the requests and "
        "catches about half of the wrong answers (0.5 uploads < 1 %).")})
    budget: int = field(default=48, metadata={"help": (
        "Samples uploaded per round per device (``selection=\"budget\"``): the most uncertain 60 % of the "
        "default 80 requests. With 32 (40 %) the first update after a shift gained +3.8 points online, with "
        "48 +7.5 (docs/RESULTS.md).")})
    byte_budget: int = field(default=256 * 1024, metadata={"help": (
        "Packet bytes per round (``selection=\"bytes\"``).")})
    token_scorer: str = field(default="ood", metadata={"help": (
        "Per-token uncertainty over the 49 visual tokens. ``\"ood\"``: diagonal Mahalanobis distance to the "
        "position's clean source statistics (:class:`TokenStats`); ``\"mc_dropout\"``: disagreement of T "
        "dropout passes through the bridge's token pathway; ``\"energy\"``: the token's L2 norm (what the "
        "authors' code effectively ranks by); ``\"random\"``: seeded uniform.")})
    keep_ratio: float = field(default=0.5, metadata={"help": (
        "Fraction of the 49 tokens uploaded per sample (0.5 was the paper's best); at least one token is "
        "always kept.")})
    direction: str = field(default="most", metadata={"help": (
        "``\"most\"`` keeps the highest-scoring (most uncertain) tokens, ``\"least\"`` the lowest.")})
    fill: str = field(default="mask", metadata={"help": (
        "How the cloud fills the dropped slots. ``\"mask\"`` (default): masked out of its bridge's "
        "cross-attention; ``\"mean\"``: the position's clean source mean (needs :class:`TokenStats`); "
        "``\"zeros\"``: zero vectors.")})
    token_code: str = field(default="pca256-ec", metadata={"help": (
        "How a kept token travels. ``\"pcaK-ec\"`` (default ``\"pca256-ec\"``): its channel mean and std and "
        "K coefficients on the shared basis (:func:`~cdcca.uplink.codec.default_token_basis`), rounded on one "
        "fixed step and LZMA-coded, ~60–75 B a token, ~1.7 KiB an upload against ~30 KiB with ``\"full\"``; "
        "the cloud rebuilds the 1280 channels, and a round changes the device bridge's token projection only "
        "within the code's span, so the change reads real tokens as it read the rebuilt ones "
        "(:func:`~cdcca.uplink.codec.code_span_factors`). "
        "``\"pcaK-int8\"`` / ``\"pcaK-int4\"``: the same coefficients with a per-token fp16 absmax scale "
        "(fixed size, coarser). ``\"full\"``: every channel at ``token_dtype``. Tokens whose width is not "
        "the basis's (tiny test models) always travel ``\"full\"``; the packet's ``code`` says which was used.")})
    token_dtype: str = field(default="int8", metadata={"help": (
        "Values of the ``\"full\"`` code: ``\"int8\"`` (per-token absmax scale in fp16, ~1 byte/channel) or "
        "``\"fp16\"``.")})
    mc_dropout_passes: int = field(default=8, metadata={"help": (
        "T, stochastic passes of the ``mc_dropout`` scorer.")})
    mc_dropout_p: float = field(default=0.1, metadata={"help": (
        "Dropout probability of the ``mc_dropout`` scorer.")})
    ood_floor: float = field(default=0.01, metadata={"help": (
        "Variance floor of the ``ood`` scorer, relative to the mean source variance (many channels of the "
        "ReLU6 feature map never fire on clean data; without a floor one stray activation would dominate a "
        "token's score).")})
    seed: int = field(default=0, metadata={"help": (
        "Seed of the ``random`` and ``mc_dropout`` scorers (deterministic uploads).")})
    allow_image: bool = field(default=False, metadata={"help": (
        "Also upload each sample's PNG. Off by default: the raw image never leaves the device unless this is "
        "set explicitly.")})
    shift_z: float = field(default=8.0, metadata={"help": (
        "> 0: the device reports a shift when the last 20 requests' ``shift_signal`` moves this many standard "
        "errors from the requests before them (cdcca.runtime.shift), and uploads ``shift_boost`` times its share "
        "for the next round's worth of requests; 0: off (the round clock alone). With the token signal, 8 fired "
        "6 to 14 requests after each shift of the built-in stream and never in 16,000 requests without one "
        "(benchmarks/shift_detector.py).")})
    shift_signal: str = field(default="tokens", metadata={"help": (
        "What the shift detector watches: ``tokens`` (each request's pooled visual tokens; any move of the "
        "image statistics) or ``uncertainty`` (the UTS sample score; a rise only).")})
    shift_boost: float = field(default=2.0, metadata={"help": (
        "Upload share multiplier right after a reported shift (at most every request).")})
    skip_top: float = field(default=0.0, metadata={"help": (
        "Share of a round's requests, the most uncertain ones, that are never uploaded (0 = the paper's "
        "policy: upload the most uncertain). CEMA (ICLR 2024) skips the samples so uncertain that neither "
        "model can answer them; > 0 makes UTS upload a band below them.")})

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
        choice("shift_signal", SHIFT_SIGNALS)
        choice("selection", SELECTIONS)
        choice("token_scorer", TOKEN_SCORER_NAMES)
        choice("direction", DIRECTIONS)
        choice("fill", FILLS)
        choice("token_dtype", TOKEN_DTYPES)
        if self.token_code != "full" and PCA_CODE.fullmatch(str(self.token_code)) is None:
            raise ValueError(f"UTSConfig.token_code must be full, pca<K>-ec, pca<K>-int8 or pca<K>-int4; got {self.token_code!r}")
        number("temperature", lambda v: v > 0, "a positive number")
        number("threshold", lambda v: True, "a finite number")
        number("budget", lambda v: v >= 0, "an integer ≥ 0", int)
        number("byte_budget", lambda v: v >= 0, "an integer ≥ 0", int)
        number("keep_ratio", lambda v: 0 < v <= 1, "in (0, 1]")
        number("skip_top", lambda v: 0 <= v < 1, "in [0, 1)")
        number("shift_z", lambda v: v >= 0, "a number ≥ 0 (0: no shift detection)")
        number("shift_boost", lambda v: v >= 1, "a number ≥ 1")
        number("mc_dropout_passes", lambda v: v >= 2, "an integer ≥ 2", int)
        number("mc_dropout_p", lambda v: 0 < v < 1, "in (0, 1)")
        number("ood_floor", lambda v: v > 0, "a positive number")
        number("seed", lambda v: True, "an integer", int)
        if not isinstance(self.allow_image, bool):
            raise ValueError(f"UTSConfig.allow_image must be True or False; got {self.allow_image!r}")
