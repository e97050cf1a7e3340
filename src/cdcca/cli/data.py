"""``cdcca data``: real datasets written as the JSONL + PNG files a user brings (docs/DATA.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cdcca.cli.common import console, fail
from cdcca.data.fashion_mnist import DEBIAN_DIR, IDXError, write_task

data_app = typer.Typer(no_args_is_help=True, help="Write a real dataset as a VQA task: train.jsonl, test.jsonl and PNG images.")


@data_app.command("fashion-mnist")
def fashion_mnist(
    out: Path = typer.Option(..., help="Output folder: train.jsonl, test.jsonl, images/."),
    source: Path | None = typer.Option(None, "--from", help="Folder of the four IDX files (default: the Debian "
                                       "package dataset-fashion-mnist's /usr/share/datasets/fashion-mnist)."),
    train: int = typer.Option(5000, help="Train images drawn (0: all 60,000); three questions each."),
    test: int = typer.Option(1000, help="Test images drawn (0: all 10,000); three questions each."),
    seed: int = typer.Option(0, help="Which images are drawn."),
):
    """Fashion-MNIST (70,000 product photos, 10 classes, MIT licence) as a VQA task: what the item is, whether
    it is footwear, what kind of item it is; every row names its question's candidates."""

    if train < 0 or test < 0:
        fail(f"--train and --test must be ≥ 0 (0: all), got {train} and {test}")
    try:
        rows = write_task(source or DEBIAN_DIR, out, {"train": train, "test": test}, seed)
    except IDXError as exc:
        fail(str(exc))
    console.print(f"wrote {rows['train']} train and {rows['test']} test rows to {out}")
    print(json.dumps({"out": str(out), **{f"{split}_rows": n for split, n in rows.items()}}))
