"""How the cloud distils, split by concern (as peft keeps "which parameters" apart from "how trained"):

    AKDConfig
      params:  TrainedParams   which adapters each phase may move
      prefix:  PrefixPhase     prefix distillation of the device's bridge (on by default)
      labels:  LabelPhase      the paper's label phase: optimiser, loss weights, gate, targets (off by default)
      replay:  Replay          rehearsal against forgetting: earlier uploads and labelled source samples
      grad_clip, seed          shared by both phases

No torch here: a config is read by the command line before any model loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# the paper's loss ablation (its Table 3): the label phase's terms switched off, by name
LOSS_ABLATIONS = {"ce": {"w_mse": 0.0, "w_wave": 0.0, "w_kl": 0.0}, "ce+mse": {"w_wave": 0.0, "w_kl": 0.0},
                  "ce+mse+wave": {"w_kl": 0.0}, "full": {}}
# which adapter tensors (by name) each phase may move: the one table of them, read by the config's check
# and by the phases themselves
TRAIN_GROUPS: dict[str, Callable[[str], bool]] = {      # akd.params.train: the label phase
    "all": lambda name: True,
    "bridge": lambda name: name.startswith("bridge."),
    "lora": lambda name: not name.startswith("bridge."),
}
PREFIX_GROUPS: dict[str, Callable[[str], bool]] = {     # akd.params.prefix_params: prefix distillation (bridge names)
    "all": lambda name: True,
    "input": lambda name: name.startswith(("token_norm.", "token_proj.", "pos")),
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainedParams:
    """Which of the student's adapter tensors each phase moves (never how they are trained)."""

    train: str = field(default="all", metadata=_help(
        "label phase: all | bridge | lora — which adapters the student updates"))
    prefix_params: str = field(default="input", metadata=_help(
        "prefix distillation: input (the bridge's input side, 0.33 M entries, fits the 256 KiB downlink) | "
        "all (2.4 M: +0.4 points dense, but DWC loses 4.5 of it)"))

    def __post_init__(self):
        if self.train not in TRAIN_GROUPS:
            raise ValueError(f"akd.params.train must be one of {', '.join(TRAIN_GROUPS)}; got {self.train!r}")
        if self.prefix_params not in PREFIX_GROUPS:
            raise ValueError(f"akd.params.prefix_params must be one of {', '.join(PREFIX_GROUPS)}; got {self.prefix_params!r}")


@dataclass
class PrefixPhase:
    """Prefix distillation (:mod:`cdcca.akd.prefix`): the device's bridge learns the teacher's prefix."""

    epochs: int = field(default=15, metadata=_help("epochs over each round's uploads + replay; 0 = off"))
    lr: float = field(default=1e-3, metadata=_help(
        "a round brings 48 uploads (+ as many replayed): 3e-4 needed 4× the epochs to move the bridge as far"))
    batch_size: int = field(default=32, metadata=_help("records per step"))
    ridge: float = field(default=100.0, metadata=_help(
        "ridge of the teacher → device prefix map fitted on clean source images"))

    def __post_init__(self):
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("akd.prefix.epochs must be ≥ 0 and akd.prefix.batch_size ≥ 1")


@dataclass
class LabelPhase:
    """The paper's label phase: CE on gated pseudo-labels + hidden MSE + wavelet L1 + logit KL."""

    epochs: int = field(default=0, metadata=_help(
        "paper: 3; off by default: with prefix distillation it added +1.5 points but cost 3.5 of clean accuracy"))
    batch_size: int = field(default=16, metadata=_help("records per step"))
    lr: float = field(default=1e-4, metadata=_help(
        "paper 3e-5 (7B LLM); 3e-4 here made the device forget clean data (-10 points)"))
    lr_final: float = field(default=1.7e-5, metadata=_help("cosine decay target (paper 5e-6: the same 1/6 ratio)"))
    weight_decay: float = field(default=0.02, metadata=_help("AdamW weight decay (paper)"))
    beta1: float = field(default=0.9, metadata=_help("AdamW β₁ (paper)"))
    beta2: float = field(default=0.95, metadata=_help("AdamW β₂ (paper)"))
    w_ce: float = field(default=1.0, metadata=_help("CE on the teacher's pseudo-labels"))
    w_mse: float = field(default=0.5, metadata=_help("hidden-state MSE (on states scaled by the teacher's RMS)"))
    w_wave: float = field(default=0.5, metadata=_help("L1 on the wavelet high bands of the hidden states"))
    w_kl: float = field(default=1.0, metadata=_help(
        "KD of the teacher's distribution over the answer candidates at the answer position (any vocabularies)"))
    temperature: float = field(default=2.0, metadata=_help("softmax temperature of the logit KD"))
    wavelet: str = field(default="db6", metadata=_help("wavelet of the high-band L1"))
    wave_levels: int = field(default=3, metadata=_help("decomposition levels of the high-band L1"))
    min_teacher_confidence: float = field(default=0.8, metadata=_help(
        "train only on pseudo-labels the teacher is this sure of (+18 points over the device on the kept "
        "uploads, against +9 ungated)"))
    weighting: str = field(default="none", metadata=_help(
        "none | entropy: per-sample 1/exp(H_teacher − E0) on CE and KL (CEMA)"))
    targets: str = field(default="hard", metadata=_help(
        "hard: CE on the teacher's argmax | soft: CE on its candidate distribution"))
    w_source: float = field(default=1.0, metadata=_help("weight of the source-rehearsal CE"))

    def __post_init__(self):
        for name in ("w_ce", "w_mse", "w_wave", "w_kl", "lr", "lr_final", "temperature", "w_source"):
            if getattr(self, name) < 0:
                raise ValueError(f"akd.labels.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.weighting not in ("none", "entropy"):
            raise ValueError(f"akd.labels.weighting must be 'none' or 'entropy'; got {self.weighting!r}")
        if self.targets not in ("hard", "soft"):
            raise ValueError(f"akd.labels.targets must be 'hard' or 'soft'; got {self.targets!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("akd.labels.epochs must be ≥ 0 and akd.labels.batch_size ≥ 1")


@dataclass
class Replay:
    """Rehearsal against forgetting: a bounded replay of earlier uploads, and clean labelled source samples."""

    capacity: int = field(default=512, metadata=_help("records kept per buffer (reservoir sampling)"))
    per_round: float = field(default=1.0, metadata=_help("replayed records per new record"))
    source: float = field(default=1.0, metadata=_help(
        "labelled clean source samples rehearsed per trained record (both phases); 0 = off"))

    def __post_init__(self):
        if self.source < 0 or self.capacity < 0 or self.per_round < 0:
            raise ValueError("akd.replay.source, capacity and per_round must be ≥ 0")


@dataclass
class AKDConfig:
    """How the cloud distils; the defaults follow the authors' released settings where they fit."""

    params: TrainedParams = field(default_factory=TrainedParams, metadata=_help("which adapters each phase moves"))
    prefix: PrefixPhase = field(default_factory=PrefixPhase, metadata=_help("prefix distillation of the bridge"))
    labels: LabelPhase = field(default_factory=LabelPhase, metadata=_help("the paper's label phase (off by default)"))
    replay: Replay = field(default_factory=Replay, metadata=_help("rehearsal of earlier uploads and source samples"))
    grad_clip: float = field(default=2.0, metadata=_help("gradient norm clip of both phases (paper)"))
    seed: int = field(default=0, metadata=_help("seeds the aligner, the replay buffers and the batch order"))

    def __post_init__(self):
        if self.labels.epochs == 0 and self.prefix.epochs == 0:
            raise ValueError("akd.labels.epochs and akd.prefix.epochs are both 0, so nothing would be trained")

    @property
    def needs_source(self) -> bool:
        """Whether the distiller needs the labelled clean source set (rehearsal or prefix anchors)."""
        return self.replay.source > 0 or self.prefix.epochs > 0
