"""The labelled clean source domain the cloud owns (the device's pretraining data): rehearsed by the
label phase against forgetting, and the anchor and fitting set of prefix distillation."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from cdcca.data.easyvqa import VQASet
from cdcca.data.features import cached_features


@dataclass
class SourceSet:
    """Labelled clean source-domain samples the cloud owns (the device's pretraining data), for rehearsal."""

    tokens: torch.Tensor        # (N_images, P, C) fp16 visual tokens
    image_ids: torch.Tensor     # (N_questions,) index into tokens
    questions: list[str]
    answers: list[str]

    def sample(self, n: int, rng: random.Random) -> tuple[torch.Tensor, list[str], list[str]]:
        idx = [rng.randrange(len(self.questions)) for _ in range(n)]
        return (self.tokens[self.image_ids[idx]].float(), [self.questions[i] for i in idx],
                [self.answers[i] for i in idx])


def random_source_set(token_dim: int, candidates: list[str], n: int = 32, seed: int = 0) -> SourceSet:
    """A source set of random tokens for the tiny random-initialised models (tests, ``--tiny`` runs)."""
    gen = torch.Generator().manual_seed(seed)
    answers = [candidates[i % len(candidates)] for i in range(n)]
    return SourceSet(torch.randn(n, 49, token_dim, generator=gen).half(), torch.arange(n),
                     [f"is the answer {a}?" for a in answers], answers)


SOURCE_IMAGES = 1000   # train images rehearsed: ~9,600 questions, features cached in ~1 min on 2 cores


def load_source_set(data: VQASet, n_images: int = SOURCE_IMAGES) -> SourceSet:
    """The first ``n_images`` images of the pair's train split, their questions and cached clean encoder
    features: the labelled source domain the device was pretrained on."""

    rows = np.flatnonzero(data.image_ids < n_images)
    return SourceSet(cached_features(data, limit=n_images), torch.as_tensor(data.image_ids[rows]),
                     [data.questions[i] for i in rows], [data.answers[i] for i in rows])
