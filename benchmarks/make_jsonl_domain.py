"""Write a VQA JSONL domain (PNG files + one JSON line per question) from easy-VQA test images under a
corruption — a stand-in for "your own data" to try ``--stream a.jsonl,b.jsonl`` with::

    PYTHONPATH=src python benchmarks/make_jsonl_domain.py --out runs/domains/fog --corruption fog:4 --images 400
    cdcca demo --preset quick --stream runs/domains/fog/fog.jsonl,runs/domains/night/night.jsonl --out runs/demo-files

The images are test images ``--first`` … ``--first + --images`` (a different block per domain keeps the
files apart); the questions and answers are easy-VQA's own.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the PNGs and NAME.jsonl")
    ap.add_argument("--corruption", default="clean", help="NAME:SEVERITY or clean")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--first", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    from cdcca.data.corruptions import corrupt
    from cdcca.data.easyvqa import load_split
    from cdcca.data.stream import Domain

    test = load_split("test")
    dom = Domain.parse(args.corruption)
    ids = np.arange(args.first, min(args.first + args.images, len(test.images)))
    images = corrupt(test.images[ids], dom.corruption, dom.severity, seed=1)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in zip(ids, images):
        Image.fromarray(img).save(args.out / f"{i}.png")
    name = args.out.name
    with (args.out / f"{name}.jsonl").open("w") as f:
        for q in np.flatnonzero(np.isin(test.image_ids, ids)):
            f.write(json.dumps({"image": f"{test.image_ids[q]}.png", "question": test.questions[q],
                                "answer": test.answers[q]}) + "\n")
    print(args.out / f"{name}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
