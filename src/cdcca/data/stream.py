"""The continual shift stream: a sequence of corruption domains over easy-VQA test images.

Test images are split once: the first half feeds the device's stream (what users ask), the
second half is held out to measure accuracy per domain after each round. A domain is written
``name:severity`` (``clean`` has no severity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdcca.data.corruptions import ALL_CORRUPTIONS
from cdcca.data.easyvqa import VQASet

# The device loses most on blur, pixelation and JPEG (the ImageNet encoder shrugs off noise and fog
# on flat shapes), so the default sequence walks through those at high severity.
DEFAULT_SEQUENCE = ("pixelate:5", "gaussian_blur:5", "jpeg:5", "low_light:5")
# corruption types outside every training family (data/corruptions.HELD_OUT): the generalisation check
UNSEEN_SEQUENCE = ("zoom_blur:5", "glass_blur:5", "downsample:5")
STREAMS = {"default": DEFAULT_SEQUENCE, "unseen": UNSEEN_SEQUENCE}


@dataclass(frozen=True)
class Domain:
    corruption: str
    severity: int

    @classmethod
    def parse(cls, text: str) -> Domain:
        name, _, sev = text.partition(":")
        if name == "clean":
            return cls("clean", 0)
        if name not in ALL_CORRUPTIONS:
            raise ValueError(f"unknown domain {text!r}; use NAME:SEVERITY with NAME in {', '.join(ALL_CORRUPTIONS)} or 'clean'")
        try:
            severity = int(sev or 5)
        except ValueError:
            raise ValueError(f"severity in {text!r} must be an integer 1..5") from None
        if not 1 <= severity <= 5:
            raise ValueError(f"severity in {text!r} must be 1..5")
        return cls(name, severity)

    def __str__(self) -> str:
        return "clean" if self.corruption == "clean" else f"{self.corruption}:{self.severity}"


def resolve_sequence(name_or_list: str | list[str]) -> list[Domain]:
    if isinstance(name_or_list, str):
        items = STREAMS.get(name_or_list) or name_or_list.split(",")
    else:
        items = name_or_list
    return [Domain.parse(s.strip()) for s in items]


def split_images(n_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stream_images, heldout_images): a fixed random halving of the test images."""
    perm = np.random.default_rng(seed).permutation(n_images)
    half = n_images // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def questions_on(data: VQASet, images: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(data.image_ids, images))


def heldout_questions(data: VQASet, n: int, seed: int = 0) -> np.ndarray:
    """A fixed sample of ``n`` questions on held-out images (same for every domain and round)."""
    _, held = split_images(len(data.images), seed)
    idx = questions_on(data, held)
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))


@dataclass
class StreamChunk:
    round: int
    domain: Domain
    question_ids: np.ndarray     # indices into the test VQASet


def build_stream(data: VQASet, sequence: list[Domain], per_domain: int, rounds_per_domain: int = 1,
                 seed: int = 0) -> list[StreamChunk]:
    """Chunks of ``per_domain // rounds_per_domain`` stream questions per round, domain after domain.

    ``seed`` picks the questions; the stream/held-out image split is fixed (seed 0, as in
    :func:`heldout_questions`), so no seed ever streams an image that accuracy is measured on."""
    stream_imgs, _ = split_images(len(data.images))
    pool = questions_on(data, stream_imgs)
    rng = np.random.default_rng(seed + 2)
    chunks, rnd = [], 0
    per_round = per_domain // rounds_per_domain
    for domain in sequence:
        picks = rng.choice(pool, size=per_domain, replace=False)
        for r in range(rounds_per_domain):
            chunks.append(StreamChunk(rnd, domain, picks[r * per_round:(r + 1) * per_round]))
            rnd += 1
    return chunks
