"""Image corruptions that never change an easy-VQA answer, each at severities 1–5.

No hue shifts (colour is an answer) and nothing that crops a shape away. Corruptions act on the
native 64×64 image before it is upsampled for the encoder, as a low-resolution camera would.
On flat-colour shapes the ImageNet encoder shrugs off noise, contrast and fog; pixelation, blur
and JPEG at high severity are what hurt, so those carry the steepest severity ladders.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round-trip float pixel maths back to an image: clipped to 0..255, uint8 (every corruption and composition)."""
    return np.clip(x, 0, 255).astype(np.uint8)


def gaussian_noise(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    sigma = [8, 14, 20, 28, 38][s - 1]
    return to_uint8(img.astype(np.float32) + rng.normal(0, sigma, img.shape))


def impulse_noise(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    p = [0.02, 0.04, 0.07, 0.10, 0.15][s - 1]
    out = img.copy()
    mask = rng.random(img.shape[:2])
    out[mask < p / 2] = 0
    out[mask > 1 - p / 2] = 255
    return out


def gaussian_blur(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius = [0.8, 1.3, 1.9, 2.6, 3.4][s - 1]
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def motion_blur(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    length = [3, 5, 7, 9, 12][s - 1]
    k = np.ones(length, np.float32) / length
    x = img.astype(np.float32)
    pad = length // 2
    xp = np.pad(x, ((0, 0), (pad, length - 1 - pad), (0, 0)), mode="edge")
    out = sum(k[i] * xp[:, i:i + x.shape[1]] for i in range(length))
    return to_uint8(out)


def contrast(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = [0.6, 0.5, 0.4, 0.3, 0.22][s - 1]
    x = img.astype(np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return to_uint8((x - mean) * c + mean)


def fog(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    a = [0.2, 0.3, 0.4, 0.5, 0.6][s - 1]
    h, w = img.shape[:2]
    coarse = rng.random((4, 4)).astype(np.float32)
    haze = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    haze = (0.6 + 0.4 * haze / 255.0)[..., None] * 255.0
    return to_uint8(img.astype(np.float32) * (1 - a) + haze * a)


def pixelate(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    side = [24, 18, 14, 11, 9][s - 1]
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((side, side), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST))


def jpeg(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    quality = [20, 12, 8, 5, 2][s - 1]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def low_light(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Darker exposure plus sensor noise: brightness scales every channel equally (no hue shift)."""
    gain, sigma = [(0.7, 4), (0.55, 6), (0.45, 8), (0.35, 10), (0.28, 12)][s - 1]
    return to_uint8(img.astype(np.float32) * gain + rng.normal(0, sigma, img.shape))


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "contrast": contrast,
    "fog": fog,
    "pixelate": pixelate,
    "jpeg": jpeg,
    "low_light": low_light,
}


def zoom_blur(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Mean of centre zooms of the image (a moving camera): blur that grows away from the centre."""
    top = [1.06, 1.10, 1.14, 1.18, 1.24][s - 1]
    h, w = img.shape[:2]
    acc = img.astype(np.float32)
    zooms = np.linspace(1.0, top, 6)[1:]
    for z in zooms:
        big = np.asarray(Image.fromarray(img).resize((round(w * z), round(h * z)), Image.BILINEAR), np.float32)
        y0, x0 = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
        acc += big[y0:y0 + h, x0:x0 + w]
    return to_uint8(acc / (len(zooms) + 1))


def glass_blur(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Frosted glass: a light blur, then every pixel swapped with a random neighbour, then blur again."""
    sigma, delta = [(0.5, 1), (0.6, 1), (0.7, 2), (0.8, 2), (1.0, 3)][s - 1]
    x = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma))).copy()
    h, w = x.shape[:2]
    dy = rng.integers(-delta, delta + 1, (h, w))
    dx = rng.integers(-delta, delta + 1, (h, w))
    yy = np.clip(np.arange(h)[:, None] + dy, 0, h - 1)
    xx = np.clip(np.arange(w)[None, :] + dx, 0, w - 1)
    return np.asarray(Image.fromarray(x[yy, xx]).filter(ImageFilter.GaussianBlur(sigma)))


def downsample(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """A low-resolution sensor: bilinear down to a small side and back up (smooth, unlike pixelate)."""
    side = [28, 22, 18, 14, 12][s - 1]
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR).resize((w, h), Image.BILINEAR))


def speckle_noise(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise (a coherent-light sensor): bright pixels get noisier, black ones stay black."""
    sigma = [0.1, 0.15, 0.22, 0.3, 0.4][s - 1]
    x = img.astype(np.float32)
    return to_uint8(x + x * rng.normal(0, sigma, img.shape))


def elastic(img: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random warp (a wobbling lens): a coarse 5×5 displacement field, bicubically smoothed, moves
    every pixel by up to a few pixels; the shape bends but stays whole."""
    amp = [1.0, 1.6, 2.2, 2.9, 3.6][s - 1]
    h, w = img.shape[:2]

    def field() -> np.ndarray:
        coarse = rng.uniform(-1, 1, (5, 5)).astype(np.float32)
        return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC)) * amp

    y = np.clip(np.arange(h)[:, None] + field(), 0, h - 1)
    x = np.clip(np.arange(w)[None, :] + field(), 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (y - y0)[..., None], (x - x0)[..., None]
    src = img.astype(np.float32)
    top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
    bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
    return to_uint8(top * (1 - fy) + bottom * fy)


# Never in any training family (the cloud's robustness recipes draw from CORRUPTIONS and the compositions of
# cdcca.data.augmix only): these measure whether what the cloud learned carries to corruption types nobody
# trained on. The first three make the ``unseen`` stream.
HELD_OUT: dict[str, Corruption] = {
    "zoom_blur": zoom_blur,
    "glass_blur": glass_blur,
    "downsample": downsample,
    "speckle_noise": speckle_noise,
    "elastic": elastic,
}
ALL_CORRUPTIONS: dict[str, Corruption] = {**CORRUPTIONS, **HELD_OUT}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one corruption to a stack of uint8 images (N, H, W, 3); deterministic given ``seed``."""
    if name == "clean":
        return images
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from: clean, {', '.join(ALL_CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    rng = np.random.default_rng(seed)
    fn = ALL_CORRUPTIONS[name]
    return np.stack([fn(img, severity, rng) for img in images])
