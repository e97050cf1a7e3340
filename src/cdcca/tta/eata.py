"""EATA (Niu et al., ICML 2022): TENT on the reliable, non-redundant samples only, weighted by how
sure each is, with a Fisher penalty that holds the parameters the source task needs.

- reliable: entropy H < E0 = 0.4·ln C (C = the answer candidates);
- non-redundant: |cos(p, running mean of p)| < d0 — the paper's 0.05 is for 1,000 ImageNet classes;
  with 13 candidates two confident predictions of different answers already have cos ≈ 0.28 to a flat
  mean, so d0 = 0.4 here (docs/BASELINES.md);
- weight 1/exp(H − E0); penalty α·Σ F·(θ − θ0)², F from the model's own labels on source samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from cdcca.akd.source_set import SourceSet
from cdcca.model.mllm import MLLM
from cdcca.model.prompt import Prompter
from cdcca.tta.common import candidate_logits, entropy, norm_parameters, only_trainable


@dataclass
class EATAConfig:
    lr: float = field(default=1e-3, metadata={"help": (
        "Adam learning rate, as TENT's; what `cdcca bench tta-rate --method eata` picks on clean data")})
    e_margin_coeff: float = field(default=0.4, metadata={"help": "E0 = coeff · ln C"})
    d_margin: float = field(default=0.4, metadata={"help": "redundancy threshold on |cos| (paper: 0.05 for 1,000 classes)"})
    fisher_alpha: float = field(default=2000.0, metadata={"help": (
        "weight of the Fisher regulariser that keeps important weights near the source")})
    fisher_samples: int = field(default=500, metadata={"help": (
        "source questions for the Fisher estimate (paper: 2,000 images)")})
    mean_momentum: float = field(default=0.9, metadata={"help": "running mean of the kept predictions"})

    def __post_init__(self):
        if self.lr <= 0 or self.fisher_alpha < 0 or not 0 < self.d_margin <= 1:
            raise ValueError("EATAConfig needs lr > 0, fisher_alpha ≥ 0 and 0 < d_margin ≤ 1")


def fisher_information(model: MLLM, prompter: Prompter, params: dict[str, torch.nn.Parameter], source: SourceSet,
                       n: int, batch: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``params`` on ``n`` labelled-free source questions: E[(∂ CE(model, own argmax))²]."""
    import random

    only_trainable(model, params)
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    rng = random.Random(seed)
    done = 0
    while done < n:
        b = min(batch, n - done)
        tokens, questions, _ = source.sample(b, rng)          # the answers are not used: own predictions
        logits = candidate_logits(model, prompter, tokens, questions)
        loss = F.cross_entropy(logits, logits.argmax(-1).detach())
        model.zero_grad(set_to_none=True)
        loss.backward()
        for k, p in params.items():
            if p.grad is not None:
                fisher[k] += p.grad.detach() ** 2 * b
        done += b
    model.zero_grad(set_to_none=True)
    return {k: f / n for k, f in fisher.items()}


class EATA:
    def __init__(self, model: MLLM, prompter: Prompter, source: SourceSet | None, cfg: EATAConfig | None = None):
        self.model, self.prompter, self.cfg = model, prompter, cfg or EATAConfig()
        self.params = norm_parameters(model)
        self.anchor = {k: p.detach().clone() for k, p in self.params.items()}
        self.fisher = (fisher_information(model, prompter, self.params, source, self.cfg.fisher_samples)
                       if source is not None and self.cfg.fisher_alpha > 0 else None)
        only_trainable(model, self.params)
        self.opt = torch.optim.Adam(self.params.values(), lr=self.cfg.lr, betas=(0.9, 0.999))
        self.e_margin = self.cfg.e_margin_coeff * math.log(len(prompter.candidates))
        self.mean_probs: torch.Tensor | None = None
        self.updates = 0
        self.seen = 0

    def select(self, probs: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        """Indices of the reliable, non-redundant samples (and the running mean update)."""
        reliable = torch.nonzero(ent < self.e_margin).flatten()
        if self.mean_probs is not None and len(reliable):
            cos = F.cosine_similarity(self.mean_probs[None], probs[reliable], dim=1)
            reliable = reliable[cos.abs() < self.cfg.d_margin]
        if len(reliable):
            batch_mean = probs[reliable].mean(0)
            m = self.cfg.mean_momentum
            self.mean_probs = batch_mean if self.mean_probs is None else m * self.mean_probs + (1 - m) * batch_mean
        return reliable

    def step(self, tokens: torch.Tensor, questions: list[str]) -> torch.Tensor:
        logits = candidate_logits(self.model, self.prompter, tokens, questions)
        probs = logits.detach().softmax(-1)
        ent = entropy(logits)
        self.seen += len(questions)
        kept = self.select(probs, ent.detach())
        if len(kept) == 0:
            return probs
        weights = torch.exp(-(ent[kept].detach() - self.e_margin))
        loss = (ent[kept] * weights).mean()
        if self.fisher is not None:
            loss = loss + self.cfg.fisher_alpha * sum((self.fisher[k] * (p - self.anchor[k]) ** 2).sum()
                                                      for k, p in self.params.items())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.updates += len(kept)
        return probs
