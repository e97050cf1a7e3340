"""easy-VQA (4,000 + 1,000 64×64 images, 13 answers) as a small in-memory dataset.

A :class:`VQASet` holds images once (uint8 H×W×3) and questions that point at them, so encoder
features can be cached per image rather than per question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from cdcca.assets import DATA_PACKAGE, INSTALL_HINT, AssetError, package_dir


@dataclass
class VQASet:
    """Images (N, H, W, 3) uint8 and questions over them; ``answers`` is the candidate set."""

    name: str
    images: np.ndarray
    questions: list[str]
    answers: list[str]                 # ground-truth answer per question
    image_ids: np.ndarray              # (Q,) index into images
    candidates: list[str] = field(default_factory=list)
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)   # JSONL file → its image rows [start, end)
    key: str = ""                      # what its feature caches are filed under ("": not cached)

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: np.ndarray | list[int], name: str | None = None) -> VQASet:
        idx = np.asarray(idx, dtype=np.int64)
        return VQASet(name or self.name, self.images, [self.questions[i] for i in idx],
                      [self.answers[i] for i in idx], self.image_ids[idx], self.candidates, self.sources, self.key)


def _load_images(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


@lru_cache(maxsize=2)
def load_split(split: str) -> VQASet:
    """Load easy-VQA ``train`` or ``test`` from the installed package."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    package_dir(DATA_PACKAGE)
    try:
        import easy_vqa
    except ImportError as exc:
        raise AssetError(f"package 'easy-vqa' is broken ({exc}); run: {INSTALL_HINT}") from exc
    get_q = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    get_p = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
    questions, answers, image_ids = get_q()
    paths = get_p()
    images = _load_images([paths[i] for i in range(len(paths))])
    return VQASet(f"easyvqa-{split}", images, list(questions), list(answers),
                  np.asarray(image_ids, dtype=np.int64), list(easy_vqa.get_answers()), key=split)


def candidate_answers() -> list[str]:
    """The 13 easy-VQA answers, in the package's order (the multiple-choice candidate set)."""
    package_dir(DATA_PACKAGE)
    import easy_vqa

    return list(easy_vqa.get_answers())
