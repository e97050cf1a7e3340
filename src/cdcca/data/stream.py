"""The continual shift stream: a sequence of domains — the task's test images under a corruption, or
your own VQA JSONL file.

A domain's images are split once: the first half feeds the device's stream (what users ask), the
second half is held out to measure accuracy per domain after each round. A built-in domain is
written ``name:severity`` (``clean`` has no severity); a file domain is its path (``night.jsonl``),
and a stream may mix both. The stream's data is the task's test set (the pair's: easy-VQA's for the shipped
weights) with every named file appended (:func:`stream_data`); its multiple-choice set is the union of all
their candidates, which a pair checks against its own (:func:`cdcca.trained_pair.run_answers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cdcca.data.corruptions import ALL_CORRUPTIONS, corrupt
from cdcca.data.easyvqa import VQASet
from cdcca.data.jsonl import load_jsonl
from cdcca.data.task import Task

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
    path: str | None = None      # a VQA JSONL file (docs/DATA.md): the domain is that data, as it is

    @classmethod
    def parse(cls, text: str) -> Domain:
        if text.strip().endswith(".jsonl"):
            return cls("file", 0, text.strip())
        name, _, sev = text.partition(":")
        if name == "clean":
            return cls("clean", 0)
        if name not in ALL_CORRUPTIONS:
            raise ValueError(f"unknown domain {text!r}; use NAME:SEVERITY with NAME in {', '.join(ALL_CORRUPTIONS)}, "
                             "'clean', or a path ending in .jsonl")
        try:
            severity = int(sev or 5)
        except ValueError:
            raise ValueError(f"severity in {text!r} must be an integer 1..5") from None
        if not 1 <= severity <= 5:
            raise ValueError(f"severity in {text!r} must be 1..5")
        return cls(name, severity)

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
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


def stream_data(sequence: list[Domain], task: Task) -> VQASet:
    """The task's test set with the images, questions and answers of every file domain appended."""
    return _merged(task, tuple(dict.fromkeys(d.path for d in sequence if d.path is not None)))


@lru_cache(maxsize=4)
def _merged(task: Task, files: tuple[str, ...]) -> VQASet:

    base = task.split("test")
    if not files:
        return base
    images, image_ids, questions, answers = [base.images], [base.image_ids], list(base.questions), list(base.answers)
    candidates, sources, offset = list(base.candidates), {}, len(base.images)
    for path in files:
        part = load_jsonl(path)
        sources[path] = (offset, offset + len(part.images))
        images.append(part.images)
        image_ids.append(part.image_ids + offset)
        questions += part.questions
        answers += part.answers
        candidates += [c for c in part.candidates if c not in candidates]
        offset += len(part.images)
    return VQASet("stream", np.concatenate(images), questions, answers, np.concatenate(image_ids), candidates, sources)


def builtin_images(data: VQASet) -> int:
    """How many of ``data``'s images are the task's test images (they come first; file domains' images follow)."""
    return min((start for start, _ in data.sources.values()), default=len(data.images))


def domain_split(data: VQASet, domain: Domain | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stream images, held-out images) of a domain: a seeded halving of its source's images —
    the task's test images for a built-in domain, the file's own for a file domain."""
    if domain is not None and domain.path is not None:
        if domain.path not in data.sources:
            raise ValueError(f"{domain.path} is not part of this data; build it with stream_data([...])")
        start, end = data.sources[domain.path]
        stream_imgs, held = split_images(end - start, seed)
        return stream_imgs + start, held + start
    return split_images(builtin_images(data), seed)


def heldout_questions(data: VQASet, n: int, seed: int = 0, domain: Domain | None = None) -> np.ndarray:
    """A fixed sample of ``n`` questions on held-out images (for built-in domains the same for every
    domain and round; a file domain has its own)."""
    _, held = domain_split(data, domain, seed)
    idx = questions_on(data, held)
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))


def domain_images(domain: Domain, data: VQASet) -> np.ndarray:
    """The uint8 frames a device sees under ``domain``, one per image of ``data`` — the pictures behind
    :func:`cdcca.runtime.evaluate.domain_tokens` (the same corruption and seed), for a client that sends
    images to a device's API. A file domain's own images are sent as they are."""

    if domain.path is not None:
        return data.images
    base_n = builtin_images(data)
    out = data.images.copy()
    out[:base_n] = corrupt(data.images[:base_n], domain.corruption, domain.severity, 0)
    return out
