"""A pilot kept reproducible: continue the cloud's end-to-end recipe on this CPU with colour questions
oversampled to half of every batch (the cloud's bridge loses colour, benchmarks/teacher_diagnosis.py)::

    PYTHONPATH=src python benchmarks/cloud_colour_pilot.py --steps 150 --out runs/cloud-colour
    cdcca eval --model cloud --weights runs/cloud-colour --stream clean,pixelate:5 --no-direct --n 600

Everything else is the shipped recipe (``cdcca.recipes.pretrain``): the nine training corruptions on 30 % of the
samples, token dropping, one-cycle schedule, resumable checkpoints. Measured in docs/notebook.md §0.1.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from cdcca.data.easyvqa import load_split
from cdcca.model.pair import SHIPPED_WEIGHTS, build_model
from cdcca.recipes import pretrain as recipe

NOT_COLOURS = {"yes", "no", "circle", "rectangle", "triangle"}   # easy-VQA's other answers


def colour_questions() -> np.ndarray:
    data = load_split("train")
    return np.flatnonzero([a not in NOT_COLOURS for a in data.answers])


def colour_heavy_batches(colour: np.ndarray):
    """``pretrain._draw_batch`` with half of each batch's questions drawn from the colour questions."""
    def draw(cfg, data, prompter, clean, variants, rng, gen):
        B = cfg.batch_size
        q = np.concatenate([rng.choice(colour, B // 2), rng.integers(0, len(data), B - B // 2)])
        img = data.image_ids[q]
        toks = clean[img].clone()
        if variants:
            aug, which = rng.random(B) < cfg.aug_share, rng.integers(0, len(variants), B)
            for i in np.flatnonzero(aug):
                toks[i] = variants[which[i]][img[i]]
        keep = recipe.random_keep(B, toks.shape[1], cfg.token_keep, gen)
        keep[torch.rand(B, generator=gen) >= cfg.token_drop_share] = True
        return toks, keep, prompter.batch([data.questions[i] for i in q], [data.answers[i] for i in q])
    return draw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", type=Path, default=Path("runs/cloud-colour"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    recipe._draw_batch = colour_heavy_batches(colour_questions())
    cfg = recipe.PretrainConfig.for_role("cloud", steps=args.steps, batch_size=32, lr=5e-4, aug_share=0.3, aug_variants=2,
                                         checkpoint_every=50, init=str(SHIPPED_WEIGHTS / "cloud.safetensors"))
    t0 = time.time()
    record = recipe.pretrain(build_model("cloud"), cfg, args.out, progress=lambda s, loss: print(
        f"step {s} loss {loss:.4f} {time.time() - t0:.0f} s", flush=True) if s % 10 == 0 else None)
    print({k: v for k, v in record.items() if k != "config"})


if __name__ == "__main__":
    main()
