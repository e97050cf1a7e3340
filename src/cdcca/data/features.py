"""Visual tokens of a task's fixed image sets, computed once and cached on disk.

The encoder is frozen, so the tokens of a split under one corruption never change: they are
computed once and kept as fp16 safetensors keyed by (the encoder, the set's content key, corruption,
severity, seed) under ``$CDCCA_CACHE/features``. Every training and evaluation path reads them from here instead of
re-encoding images (feature extraction runs at ~22 images/s on 2 cores).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from cdcca.assets import cache_dir
from cdcca.atomic import write_safetensors
from cdcca.data.augmix import corrupt_mixed
from cdcca.data.corruptions import corrupt
from cdcca.data.easyvqa import VQASet
from cdcca.model.encoder import encode_images, encoder_tag, load_encoder


def feature_cache_path(data: VQASet, corruption: str, severity: int, seed: int, limit: int | None = None) -> Path:
    if not data.key:
        raise ValueError(f"{data.name} has no cache key: only a task's splits and JSONL files are cached")
    tag = "clean" if corruption == "clean" else f"{corruption}-s{severity}-seed{seed}"
    if limit is not None:
        tag += f"-first{limit}"
    return cache_dir() / "features" / f"{encoder_tag()}-{data.key}-{tag}.safetensors"


def cached_features(data: VQASet, corruption: str = "clean", severity: int = 0, seed: int = 0,
                    encoder: nn.Module | None = None, progress=None, device: str = "cpu",
                    limit: int | None = None) -> torch.Tensor:
    """Tokens of every image (or the first ``limit``) of a task's split under one corruption, cached."""
    if limit is not None:
        full = feature_cache_path(data, corruption, severity, seed)
        if full.is_file():          # the whole split is cached already: its first rows are the same tokens
            return cached_features(data, corruption, severity, seed)[:limit]
    path = feature_cache_path(data, corruption, severity, seed, limit)
    if path.is_file():
        try:
            return load_file(path)["tokens"]
        except Exception:
            path.unlink()   # a torn write from an interrupted run: recompute
    images = corrupt(data.images[:limit], corruption, severity, seed)
    tokens = encode_images(encoder or load_encoder().to(device), images, progress=progress,
                           batch_size=256 if device != "cpu" else 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tokens(path, tokens)
    return tokens


def augmented_cache_path(data: VQASet, family: list[str], severity: tuple[int, int], variant: int, seed: int) -> Path:
    tag = hashlib.sha256(json.dumps([sorted(family), list(severity)]).encode()).hexdigest()[:10]
    return cache_dir() / "features" / f"{encoder_tag()}-{data.key}-aug{tag}-v{variant}-seed{seed}.safetensors"


def augmented_features(data: VQASet, family: list[str], severity: tuple[int, int], variant: int, seed: int,
                       device: str = "cpu", progress=None) -> torch.Tensor:
    """Tokens of a corrupted copy of every train image, each image under its own random corruption of
    ``family`` (the cloud's training family); ``variant`` numbers independent copies."""
    path = augmented_cache_path(data, family, severity, variant, seed)
    if path.is_file():
        return load_file(str(path))["tokens"]
    images = corrupt_mixed(data.images, family, severity, seed=seed * 1000 + variant)
    tokens = encode_images(load_encoder().to(device), images, batch_size=256 if device != "cpu" else 64,
                           progress=progress)
    save_tokens(path, tokens)
    return tokens


def image_set_features(images) -> torch.Tensor:
    """Tokens of any stack of uint8 images (a user's JSONL file), cached on disk by the images' content."""
    digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    path = cache_dir() / "features" / f"{encoder_tag()}-jsonl-{digest}.safetensors"
    if path.is_file():
        return load_file(str(path))["tokens"]
    tokens = encode_images(load_encoder(), images)
    save_tokens(path, tokens)
    return tokens


def save_tokens(path: Path, tokens: torch.Tensor) -> None:
    """Write a feature cache file atomically, so an interrupted run never leaves a torn file."""
    write_safetensors(path, {"tokens": tokens})
