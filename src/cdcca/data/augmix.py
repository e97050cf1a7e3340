"""Training-only compositions: what the cloud may learn robustness from without ever being scored on it.

The nine corruption families (:data:`cdcca.data.corruptions.CORRUPTIONS`) are each one named distortion.
A teacher trained on them learns those nine; these two teach invariance more broadly:

- ``augmix`` (Hendrycks et al., ICLR 2020): the image mixed with three chains of one to three random
  primitive operations (exposure, contrast, posterize, sharpness, small rotations, shears and shifts), the
  chains weighted by a Dirichlet draw and mixed back with the original by a Beta draw;
- ``spectral_noise`` (Fourier-basis noise, Yin et al., NeurIPS 2019): noise confined to one random band of
  spatial frequencies, from coarse blotches to fine grain.

Neither is a stream domain, and neither contains a blur, a resampling, a warp or a multiplicative noise, so
the held-out types (:data:`cdcca.data.corruptions.HELD_OUT`) stay outside every family the cloud trains on.
Like the corruptions they keep every answer: luminance only (no hue shift) and no crop of the shape.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from cdcca.data.corruptions import CORRUPTIONS, Corruption, to_uint8


def _fill(img: np.ndarray) -> tuple[int, int, int]:
    """The background colour a geometric operation fills with: the top-left pixel (easy-VQA's backgrounds are flat)."""
    return tuple(int(c) for c in img[0, 0])


def _rotate(img: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(img).rotate(float(rng.uniform(-1, 1)) * 6 * m, Image.BILINEAR,
                                                  fillcolor=_fill(img)))


def _shear(img: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    k = float(rng.uniform(-1, 1)) * 0.06 * m
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).transform((w, h), Image.AFFINE, (1, k, -k * h / 2, 0, 1, 0),
                                                     Image.BILINEAR, fillcolor=_fill(img)))


def _shift(img: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    dx, dy = (round(v) for v in rng.uniform(-1, 1, 2) * 1.2 * m)
    return np.asarray(Image.fromarray(img).transform(img.shape[1::-1], Image.AFFINE, (1, 0, dx, 0, 1, dy),
                                                     fillcolor=_fill(img)))


def _exposure(img: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    return to_uint8(img.astype(np.float32) * (1 + float(rng.uniform(-1, 1)) * 0.12 * m))


def _contrast(img: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Contrast(Image.fromarray(img)).enhance(1 + float(rng.uniform(-1, 1)) * 0.12 * m))


def _sharpness(img: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(1 + float(rng.uniform(-1, 1)) * 0.3 * m))


def _posterize(img: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.posterize(Image.fromarray(img), max(2, 8 - m)))


OPERATIONS = (_rotate, _shear, _shift, _exposure, _contrast, _sharpness, _posterize)


def augmix(img: np.ndarray, s: int, rng: np.random.Generator, width: int = 3) -> np.ndarray:
    """The image mixed with ``width`` chains of random operations; severity ``s`` scales every operation."""
    weights = rng.dirichlet(np.ones(width)).astype(np.float32)
    mix = np.zeros(img.shape, np.float32)
    for w in weights:
        x = img
        for _ in range(int(rng.integers(1, 4))):
            x = OPERATIONS[int(rng.integers(len(OPERATIONS)))](x, s, rng)
        mix += w * x.astype(np.float32)
    keep = float(rng.beta(1.0, 1.0))
    return to_uint8(keep * img.astype(np.float32) + (1 - keep) * mix)


def spectral_noise(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise kept in one random annulus of spatial frequencies, the same on every channel (no hue)."""
    h, w = img.shape[:2]
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.rfftfreq(w), indexing="ij"))
    low = float(rng.uniform(0.02, 0.4))
    band = (radius >= low) & (radius < low * 1.6)
    noise = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(h, w))) * band, s=(h, w))
    sigma = [6, 10, 14, 19, 25][s - 1]
    noise *= sigma / max(float(noise.std()), 1e-6)
    return to_uint8(img.astype(np.float32) + noise[..., None])


COMPOSITIONS: dict[str, Corruption] = {"augmix": augmix, "spectral_noise": spectral_noise}
# what a training family may name: the nine corruptions and the compositions; never a held-out type
TRAINING: dict[str, Corruption] = {**CORRUPTIONS, **COMPOSITIONS}


def check_family(owner: str, family: list[str]) -> None:
    """A one-line ValueError naming what a training family may hold, if ``family`` names anything else."""
    unknown = set(family) - set(TRAINING)
    if unknown:
        raise ValueError(f"{owner}.aug_family has unknown names {sorted(unknown)}; a training family draws from "
                         f"{', '.join(sorted(TRAINING))}")


def corrupt_mixed(images: np.ndarray, family: list[str], severities: tuple[int, int], seed: int) -> np.ndarray:
    """Each image gets its own random corruption or composition from ``family`` at a severity in [lo, hi]
    (augmentation)."""
    check_family("corrupt_mixed", family)
    rng = np.random.default_rng(seed)
    lo, hi = severities
    out = np.empty_like(images)
    for i, img in enumerate(images):
        name = family[rng.integers(len(family))]
        out[i] = TRAINING[name](img, int(rng.integers(lo, hi + 1)), rng)
    return out
