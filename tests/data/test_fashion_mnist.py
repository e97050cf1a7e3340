"""Fashion-MNIST as a VQA task, on small IDX files the test writes itself (no apt in CI)."""

import gzip
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cdcca.cli.main import app
from cdcca.data.fashion_mnist import CLASSES, IDXError, read_idx, write_task
from cdcca.data.jsonl import load_jsonl


def idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def fake_fashion_mnist(folder, n_train: int = 12, n_test: int = 10):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def test_each_image_becomes_three_questions_answered_from_its_class(tmp_path):
    src = fake_fashion_mnist(tmp_path / "idx")
    rows = write_task(src, tmp_path / "task", {"train": 0, "test": 4}, seed=1)
    assert rows == {"train": 36, "test": 12}
    data = load_jsonl(tmp_path / "task" / "train.jsonl")
    assert len(data.images) == 12 and data.images.shape[1:] == (64, 64, 3)
    lines = [json.loads(line) for line in (tmp_path / "task" / "train.jsonl").read_text().splitlines()]
    by_image = {}
    for r in lines:
        by_image.setdefault(r["image"], {})[r["question"]] = r["answer"]
        assert r["answer"] in r["candidates"]
    boot = by_image["images/train/00009.png"]                        # label 9: ankle boot
    assert boot == {"What is this item?": "ankle boot", "Is this footwear?": "yes", "What kind of item is this?": "footwear"}
    assert by_image["images/train/00000.png"]["What kind of item is this?"] == "top"      # label 0: t-shirt
    assert set(data.candidates) >= set(CLASSES) | {"yes", "no"}


def test_a_damaged_idx_file_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    src = fake_fashion_mnist(tmp_path / "idx")
    good = (src / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(gzip.decompress(good)[:-3]))      # truncated
    with pytest.raises(IDXError, match="the header says 10 = 10 bytes, the file holds 7") as err:
        write_task(src, tmp_path / "task", {"train": 0, "test": 0})
    assert "\n" not in str(err.value) and not (tmp_path / "task").exists()
    idx(tmp_path / "bad", np.zeros((2, 2)), gz=False)
    with pytest.raises(IDXError, match="not an IDX file of uint8 with 3 dimension"):
        read_idx(tmp_path / "bad", 3)


def test_the_command_writes_the_task_and_names_a_missing_folder(tmp_path):
    src = fake_fashion_mnist(tmp_path / "idx")
    run = CliRunner().invoke
    ok = run(app, ["data", "fashion-mnist", "--from", str(src), "--out", str(tmp_path / "task"), "--train", "5", "--test", "3"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout.strip().splitlines()[-1])["train_rows"] == 15
    missing = run(app, ["data", "fashion-mnist", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "dataset-fashion-mnist" in " ".join(missing.output.split())
