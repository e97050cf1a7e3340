"""What the teacher leaves for the student: one record per uploaded sample, and the bounded replay of them."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


@dataclass
class TeacherRecord:
    """Everything the student needs about one uploaded sample; the teacher is never run again for it."""

    sample_id: str
    tokens: torch.Tensor        # (P, C) fp16, dropped slots filled as the uplink configured
    keep: torch.Tensor          # (P,) bool
    question: str
    pseudo_label: str
    confidence: float           # teacher's probability of its pseudo-label among the candidates
    hidden: torch.Tensor        # (Q + T_prompt, d_t) fp16, pre-norm last layer, visual + prompt positions
    logits: torch.Tensor        # (n_candidates,) fp16: the teacher's score of each answer candidate
    probs: torch.Tensor | None = None   # (n_candidates,) teacher's distribution over the answer candidates
    prefix: torch.Tensor | None = None  # (Q, d_t) fp16 teacher bridge output on the uploaded tokens

    @property
    def answered(self) -> bool:
        """False for a prefix-only record: the teacher's LLM was not run (nothing needed its answer)."""
        return bool(self.pseudo_label)

    @property
    def entropy(self) -> float:
        """Teacher entropy over the candidates (nats); 0 when the label is known for certain."""
        if self.probs is None:
            return 0.0
        p = self.probs.float().clamp_min(1e-12)
        return float(-(p * p.log()).sum())


def with_true_labels(records: list[TeacherRecord], truth: Sequence[str], candidates: list[str]) -> list[TeacherRecord]:
    """The oracle: the same records with the true answer as the label (confidence 1, one-hot targets).

    Everything else — tokens, keep masks, teacher hidden states and logits — is left as it was, so an
    oracle run differs from a teacher run in the labels alone.
    """
    out = []
    for r, answer in zip(records, truth, strict=True):
        onehot = torch.zeros(len(candidates))
        if answer in candidates:
            onehot[candidates.index(answer)] = 1.0
        out.append(replace(r, pseudo_label=answer, confidence=1.0, probs=onehot))
    return out


class ReplayBuffer:
    """Reservoir sample of earlier teacher records, bounded in size, so old domains are not forgotten."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.items: list[TeacherRecord] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, records: list[TeacherRecord]) -> None:
        for r in records:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(r)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.capacity:
                    self.items[j] = r

    def sample(self, n: int) -> list[TeacherRecord]:
        return self.rng.sample(self.items, min(n, len(self.items)))
