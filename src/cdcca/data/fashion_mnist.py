"""Fashion-MNIST as a VQA task: the second real dataset, written as the JSONL + PNG files any user brings.

Fashion-MNIST (Zalando, MIT licence) is 70,000 28×28 greyscale product photos in 10 classes; the Debian
package ``dataset-fashion-mnist`` installs its four IDX files (``dpkg -L dataset-fashion-mnist``). Each
image becomes three questions whose answers follow from its class alone:

    "What is this item?"          the class: t-shirt, trouser, pullover, dress, coat, sandal, shirt,
                                  sneaker, bag, ankle boot (some of several tokens)
    "Is this footwear?"           yes | no
    "What kind of item is this?"  top | bottom | dress | footwear | bag

Every row names its question's candidates, so multiple choice is among the answers that make sense. The
IDX reader is strict: a wrong magic number, a size that does not match the header or trailing bytes is a
one-line :class:`IDXError` naming the file; nothing is written before every file has been read.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cdcca.atomic import atomic_write

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
KIND = {"t-shirt": "top", "trouser": "bottom", "pullover": "top", "dress": "dress", "coat": "top", "sandal": "footwear",
        "shirt": "top", "sneaker": "footwear", "bag": "bag", "ankle boot": "footwear"}
KINDS = ("top", "bottom", "dress", "footwear", "bag")
MAX_IDX_BYTES = 64 * 2**20          # the largest file (train images) is 47 MiB unpacked


class IDXError(ValueError):
    """An IDX file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Question:
    text: str
    candidates: tuple[str, ...]

    def answer(self, label: int) -> str:
        item = CLASSES[label]
        if self.candidates == CLASSES:
            return item
        if self.candidates == KINDS:
            return KIND[item]
        return "yes" if KIND[item] == "footwear" else "no"


QUESTIONS = (Question("What is this item?", CLASSES), Question("Is this footwear?", ("yes", "no")),
             Question("What kind of item is this?", KINDS))


def read_idx(path: Path, dims: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped or not) with ``dims`` dimensions, checked against its header."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            with gzip.open(path) as f:
                raw = f.read(MAX_IDX_BYTES + 1)
    except FileNotFoundError:
        raise IDXError(f"{path}: no such file; install the Debian package dataset-fashion-mnist or pass --from DIR") from None
    except (OSError, EOFError) as exc:
        raise IDXError(f"{path}: not a readable (gzipped) IDX file ({exc})") from None
    if len(raw) > MAX_IDX_BYTES:
        raise IDXError(f"{path}: larger than {MAX_IDX_BYTES} bytes unpacked; not a Fashion-MNIST file")
    header = 4 + 4 * dims
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != dims:
        raise IDXError(f"{path}: not an IDX file of uint8 with {dims} dimension(s) (magic {raw[:4].hex() or 'missing'})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    size = int(np.prod(shape))
    if len(raw) != header + size:
        raise IDXError(f"{path}: the header says {'×'.join(map(str, shape))} = {size} bytes, the file holds "
                       f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_split(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28), labels (N,)) of ``split``; the files may end in ``.gz`` or not."""
    found = []
    for name, dims in zip(SPLITS[split], (3, 1)):
        path = next((p for p in (src / f"{name}.gz", src / name) if p.is_file()), src / f"{name}.gz")
        found.append(read_idx(path, dims))
    images, labels = found
    if len(images) != len(labels) or (labels.size and labels.max() >= len(CLASSES)):
        raise IDXError(f"{src}: {split} has {len(images)} images and {len(labels)} labels in 0..{labels.max()}; "
                       f"expected one label in 0..{len(CLASSES) - 1} per image")
    return images, labels


def write_task(src: Path, out: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, int]:
    """Write ``out/{split}.jsonl`` and ``out/images/{split}/*.png``: ``sizes[split]`` images of each split (0:
    all) drawn with ``seed``, three questions each. Returns the rows written per split."""
    data = {split: read_split(src, split) for split in sizes}          # everything is read before anything is written
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in sizes.items():
        images, labels = data[split]
        picks = np.sort(rng.permutation(len(images))[:n or len(images)])
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in picks:
            name = f"images/{split}/{i:05d}.png"
            Image.fromarray(images[i]).save(out / name)
            rows += [{"image": name, "question": q.text, "answer": q.answer(int(labels[i])), "candidates": list(q.candidates)}
                     for q in QUESTIONS]
        atomic_write(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        written[split] = len(rows)
    return written
