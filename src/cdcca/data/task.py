"""A task: the data a model pair is trained and measured on — easy-VQA (built in) or a user's own
``train.jsonl`` + ``test.jsonl`` (docs/DATA.md).

A pair of weights records its task (:mod:`cdcca.weights_dir`), and everything downstream reads the task
from there: the answer set multiple choice ranks, the test images the stream's shifts are applied to and
the clean reference forgetting is measured on, the labelled source set the cloud rehearses, the images the
uplink's statistics and basis are fitted on. A user's path never reaches easy-VQA unless their pair was
trained on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cdcca.data.easyvqa import VQASet, load_split
from cdcca.data.jsonl import RowError, load_jsonl

EASYVQA = "easy-vqa"
SPLITS = ("train", "test")


class TaskError(ValueError):
    """A task's files are missing, malformed or no longer what a pair was trained on; the message says which."""


@dataclass(frozen=True)
class Task:
    """Where a task's two splits live (``None``: the built-in easy-VQA)."""

    name: str = EASYVQA
    train_path: str | None = None
    test_path: str | None = None

    @classmethod
    def from_files(cls, train: str | Path, test: str | Path, name: str | None = None) -> Task:
        """A user's task from its two JSONL files (absolute paths are recorded, so a run can start anywhere)."""
        paths = [Path(train).resolve(), Path(test).resolve()]
        for flag, path in zip(("--data", "--eval"), paths):
            if not path.is_file():
                raise TaskError(f"{flag} {path}: no such VQA JSONL file (docs/DATA.md gives the schema)")
        return cls(name or paths[0].parent.name or paths[0].stem, str(paths[0]), str(paths[1]))

    @property
    def builtin(self) -> bool:
        return self.train_path is None

    def split(self, split: str) -> VQASet:
        """The ``train`` or ``test`` split, loaded once per process."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        path = getattr(self, f"{split}_path")
        stat = Path(path).stat() if path is not None and Path(path).is_file() else None
        return _load(self, split, None if stat is None else (stat.st_mtime_ns, stat.st_size))

    @property
    def answers(self) -> list[str]:
        """The answer set: every candidate of the train split (easy-VQA: its 13, in the package's order)."""
        return list(self.split("train").candidates)

    def check(self) -> None:
        """Every test answer must be one the train split can teach; otherwise the test set cannot be scored."""
        foreign = sorted(set(self.split("test").candidates) - set(self.answers))
        if foreign:
            raise TaskError(f"{self.test_path}: answers {foreign[:5]} are not in {self.train_path}'s answer set; "
                            "a test answer must appear among the train rows' answers or candidates")

    def record(self) -> dict:
        """What a pair's record says of its task: the files, each split's content digest, the answer set."""
        return {"name": self.name, "train": self.train_path, "test": self.test_path,
                "digest": {s: self.split(s).key for s in SPLITS}, "answers": self.answers}

    @classmethod
    def from_record(cls, record: dict) -> Task:
        """The task a pair was trained on; refuses in one line if its files changed or went missing."""
        task = cls(record["name"], record.get("train"), record.get("test"))
        for split in SPLITS:
            path = getattr(task, f"{split}_path")
            if path is not None and not Path(path).is_file():
                raise TaskError(f"the pair was trained on {path}, which is gone; put it back or pretrain again "
                                "(cdcca pretrain --data … --eval …)")
        digest = record.get("digest", {})
        for split in SPLITS:
            if split in digest and task.split(split).key != digest[split]:
                raise TaskError(f"{getattr(task, f'{split}_path') or 'easy-VQA ' + split} changed since the pair was "
                                f"trained on it (content {task.split(split).key} ≠ recorded {digest[split]}); "
                                "restore it or pretrain again")
        return task


@lru_cache(maxsize=8)
def _load(task: Task, split: str, stamp: tuple[int, int] | None) -> VQASet:
    """One split, read again only when its file changed (``stamp``: modification time and size)."""
    if task.builtin:
        return load_split(split)
    try:
        return load_jsonl(getattr(task, f"{split}_path"))
    except (RowError, FileNotFoundError) as exc:
        raise TaskError(str(exc)) from None

