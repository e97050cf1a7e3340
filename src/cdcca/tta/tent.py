"""TENT (Wang et al., ICLR 2021): one entropy-minimisation step per batch on the normalisation affines.

The prediction a user gets comes from the same forward pass as the loss (before the step), as in
the paper; adaptation is online and continual (never reset between domains).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cdcca.model.mllm import MLLM
from cdcca.model.prompt import Prompter
from cdcca.tta.common import candidate_logits, entropy, norm_parameters, only_trainable


@dataclass
class TentConfig:
    lr: float = field(default=1e-3, metadata={"help": (
        "Adam learning rate, the paper's CIFAR setting; also what `cdcca bench tta-rate` picks on the clean source domain")})
    steps: int = field(default=1, metadata={"help": "optimisation steps per batch"})

    def __post_init__(self):
        if self.lr <= 0 or self.steps < 1:
            raise ValueError(f"TentConfig needs lr > 0 and steps ≥ 1; got lr={self.lr}, steps={self.steps}")


class Tent:
    def __init__(self, model: MLLM, prompter: Prompter, cfg: TentConfig | None = None):
        self.model, self.prompter, self.cfg = model, prompter, cfg or TentConfig()
        self.params = norm_parameters(model)
        only_trainable(model, self.params)
        self.opt = torch.optim.Adam(self.params.values(), lr=self.cfg.lr, betas=(0.9, 0.999))
        self.updates = 0

    def step(self, tokens: torch.Tensor, questions: list[str]) -> torch.Tensor:
        probs = None
        for _ in range(self.cfg.steps):
            logits = candidate_logits(self.model, self.prompter, tokens, questions)
            if probs is None:
                probs = logits.detach().softmax(-1)
            loss = entropy(logits).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.updates += len(questions)
        return probs
