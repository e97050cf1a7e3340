"""Users' own VQA data as JSONL: one request per line.

    {"image": "photos/0001.png", "question": "what color is the car?", "answer": "red",
     "candidates": ["red", "blue", "green"]}

``image`` is a path (relative paths resolve against the JSONL file's folder); ``candidates`` is
optional (default: every distinct answer in the file); ``id`` is optional and yours (kept out of training). A bad row raises :class:`RowError` naming the
file, the 1-based line number and what is wrong; nothing is half-loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cdcca.data.easyvqa import VQASet

IMAGE_SIZE = 64
MAX_TEXT = 1000


class RowError(ValueError):
    """A row of a VQA JSONL file is malformed; the message names file, line and reason."""


def parse_row(path: Path, lineno: int, line: str, require_answer: bool = True) -> dict:
    """One JSONL line validated: the row as a dict, or :class:`RowError` naming file, line and reason."""
    def bad(why: str) -> RowError:
        return RowError(f"{path}:{lineno}: {why}")

    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise bad(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise bad("each line must be a JSON object with image, question and answer")
    required = ("image", "question", "answer") if require_answer else ("image", "question")
    missing = [k for k in required if k not in row]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    for key in ("image", "question", "answer"):
        if key not in row:
            continue
        if not isinstance(row[key], str) or not row[key].strip():
            raise bad(f"'{key}' must be a non-empty string")
        if len(row[key]) > MAX_TEXT:
            raise bad(f"'{key}' is longer than {MAX_TEXT} characters")
    cands = row.get("candidates")
    if cands is not None:
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) and c.strip() for c in cands):
            raise bad("'candidates' must be a non-empty list of strings")
        if "answer" in row and row["answer"] not in cands:
            raise bad(f"answer {row['answer']!r} is not among its candidates")
    if "id" in row and (isinstance(row["id"], bool) or not isinstance(row["id"], (str, int))):
        raise bad("'id' must be a string or an integer")
    unknown = set(row) - {"id", "image", "question", "answer", "candidates"}
    if unknown:
        raise bad(f"unknown field(s) {', '.join(sorted(unknown))}")
    return row


def load_jsonl(path: str | Path, image_size: int = IMAGE_SIZE, require_answer: bool = True) -> VQASet:
    """Read and validate every row, then load the images (resized to ``image_size``²). Requests to
    serve need no ``answer`` (``require_answer=False``: missing answers are None); evaluation does."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VQA JSONL file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                rows.append((lineno, parse_row(path, lineno, line, require_answer)))
    if not rows:
        raise RowError(f"{path}: no rows")
    image_index: dict[Path, int] = {}
    images = []
    for lineno, row in rows:
        img_path = (path.parent / row["image"]).resolve()
        if img_path not in image_index:
            try:
                with Image.open(img_path) as im:
                    images.append(np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)))
            except FileNotFoundError:
                raise RowError(f"{path}:{lineno}: image {row['image']!r} not found (looked at {img_path})") from None
            except (UnidentifiedImageError, OSError) as exc:
                raise RowError(f"{path}:{lineno}: image {row['image']!r} is not a readable image ({exc})") from None
            image_index[img_path] = len(images) - 1
        row["_image_id"] = image_index[img_path]
    candidates = sorted({c for _, r in rows for c in (r.get("candidates") or [r.get("answer")]) if c is not None})
    data = VQASet(path.stem, np.stack(images), [r["question"] for _, r in rows], [r.get("answer") for _, r in rows],
                  np.array([r["_image_id"] for _, r in rows]), candidates)
    data.key = content_key(data)
    return data


def content_key(data: VQASet) -> str:
    """A short digest of a set's images, questions and answers: the name its feature caches are filed
    under, and what a pair's record checks its data against."""
    h = hashlib.sha256(data.images.tobytes())
    h.update(json.dumps([data.questions, data.answers, data.image_ids.tolist()]).encode())
    return "jsonl-" + h.hexdigest()[:16]
