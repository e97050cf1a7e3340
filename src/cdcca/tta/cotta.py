"""CoTTA (Wang et al., CVPR 2022): a mean teacher (EMA 0.999) whose prediction — averaged over
augmented views when the frozen source model is unsure — the student follows by soft CE; after
every step each adapted weight returns to its source value with probability p (stochastic restore).

The device has no image after encoding, so the views augment its **tokens**: a random quarter of
the 49 patch tokens masked out of the bridge's attention, Gaussian noise at 10 % of each token's
scale, and a per-channel gain of 1 ± 0.1 — the token-space analogues of the paper's crop, noise
and colour jitter. The paper averages 32 views; 8 fit a 2-core device (docs/BASELINES.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from cdcca.model.mllm import MLLM
from cdcca.model.prompt import Prompter
from cdcca.tta.common import adapter_parameters, candidate_logits, only_trainable


@dataclass
class CoTTAConfig:
    lr: float = field(default=3e-3, metadata={"help": (
        "Adam learning rate, chosen on the clean source domain (`cdcca bench tta-rate --method cotta`)")})
    ema: float = field(default=0.999, metadata={"help": "teacher momentum"})
    restore_p: float = field(default=0.01, metadata={"help": "stochastic restore probability per weight and step"})
    threshold: float = field(default=0.92, metadata={"help": (
        "augment when the source model's mean confidence is below (CIFAR-10's)")})
    views: int = field(default=8, metadata={"help": "augmented views averaged when the source model is unsure"})
    drop: float = field(default=0.25, metadata={"help": "share of tokens masked in a view"})
    noise: float = field(default=0.1, metadata={"help": "noise std relative to each token's std"})
    gain: float = field(default=0.1, metadata={"help": "per-channel gain jitter"})
    seed: int = field(default=0, metadata={"help": "seeds the views and the stochastic restore"})

    def __post_init__(self):
        if not 0 <= self.restore_p <= 1 or not 0 < self.ema <= 1 or self.views < 1:
            raise ValueError("CoTTAConfig needs 0 ≤ restore_p ≤ 1, 0 < ema ≤ 1 and views ≥ 1")


def token_view(tokens: torch.Tensor, cfg: CoTTAConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented view of (B, P, C) tokens and its keep mask (B, P)."""
    B, P, C = tokens.shape
    keep = torch.rand(B, P, generator=gen) >= cfg.drop
    keep[:, 0] |= ~keep.any(1)                                  # never drop every token of a sample
    scale = tokens.std(-1, keepdim=True)
    noisy = tokens + cfg.noise * scale * torch.randn(tokens.shape, generator=gen)
    gain = 1 + cfg.gain * (2 * torch.rand(B, 1, C, generator=gen) - 1)
    return noisy * gain, keep


class CoTTA:
    def __init__(self, model: MLLM, prompter: Prompter, cfg: CoTTAConfig | None = None):
        self.model, self.prompter, self.cfg = model, prompter, cfg or CoTTAConfig()
        self.params = adapter_parameters(model)
        self.source = {k: p.detach().clone() for k, p in self.params.items()}
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.anchor = copy.deepcopy(model).requires_grad_(False)
        self.teacher_params = adapter_parameters(self.teacher)
        only_trainable(model, self.params)
        self.opt = torch.optim.Adam(self.params.values(), lr=self.cfg.lr, betas=(0.9, 0.999))
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.updates = 0
        self.augmented_batches = 0
        self.restored = 0

    @property
    def predictor(self) -> MLLM:
        """The model whose answers CoTTA gives: the mean teacher (held-out evaluation uses it too,
        without the augmentation average)."""
        return self.teacher

    @torch.no_grad()
    def teacher_logits(self, tokens: torch.Tensor, questions: list[str]) -> torch.Tensor:
        anchor_conf = candidate_logits(self.anchor, self.prompter, tokens, questions).softmax(-1).max(-1).values
        logits = candidate_logits(self.teacher, self.prompter, tokens, questions)
        if anchor_conf.mean() < self.cfg.threshold:
            self.augmented_batches += 1
            views = []
            for _ in range(self.cfg.views):
                view, keep = token_view(tokens, self.cfg, self.gen)
                views.append(candidate_logits(self.teacher, self.prompter, view, questions, keep))
            logits = torch.stack(views).mean(0)
        return logits

    def step(self, tokens: torch.Tensor, questions: list[str]) -> torch.Tensor:
        target = self.teacher_logits(tokens, questions)
        student = candidate_logits(self.model, self.prompter, tokens, questions)
        loss = -(target.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.updates += len(questions)
        self._update_teacher()
        self._restore()
        return target.softmax(-1)

    @torch.no_grad()
    def _update_teacher(self) -> None:
        a = self.cfg.ema
        for k, p in self.params.items():
            self.teacher_params[k].mul_(a).add_(p.detach(), alpha=1 - a)

    @torch.no_grad()
    def _restore(self) -> None:
        """Each adapted weight back to its source value with probability ``restore_p``."""
        for k, p in self.params.items():
            mask = torch.rand(p.shape, generator=self.gen) < self.cfg.restore_p
            p.copy_(torch.where(mask, self.source[k], p))
            self.restored += int(mask.sum())
