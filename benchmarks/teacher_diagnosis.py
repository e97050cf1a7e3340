"""Why the cloud teacher is weaker than the device on clean images: per question type, on train and test,
and whether its bridge's visual prefix still carries the shape's colour (a linear probe)::

    PYTHONPATH=src python benchmarks/teacher_diagnosis.py --n 600 > runs/teacher_diagnosis.json

Same-accuracy train and test means the model underfits rather than overfits. A probe that reads the
colour from the device's prefix but not from the cloud's says the information is lost in the cloud's
bridge, before the LLM — so training the LLM's top layers cannot bring it back, only the bridge.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch.nn import functional as F

from cdcca.akd.prefix import bridge_prefix
from cdcca.assets import load_tokenizer
from cdcca.data.easyvqa import candidate_answers, load_split
from cdcca.data.features import cached_features
from cdcca.model.answer import mc_predict
from cdcca.model.pair import load_pretrained
from cdcca.model.prompt import Prompter


def kind(answer: str) -> str:
    """easy-VQA's three kinds of answer."""
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in ("circle", "rectangle", "triangle") else "colour"


def errors_by_type(model, prompter: Prompter, split: str, n: int) -> dict:
    """MC accuracy and wrong answers per question type on ``n`` random clean questions of ``split``."""
    data, tokens = load_split(split), cached_features(load_split(split))
    ids = np.random.default_rng(1).choice(len(data), n, replace=False)
    wrong, total = {}, {}
    for s in range(0, n, 64):
        b = ids[s:s + 64]
        picks = mc_predict(model, prompter, tokens[data.image_ids[b]], [data.questions[i] for i in b]).argmax(-1)
        for i, p in zip(b, picks):
            k = kind(data.answers[i])
            total[k] = total.get(k, 0) + 1
            wrong[k] = wrong.get(k, 0) + int(prompter.candidates[int(p)] != data.answers[i])
    return {"mc": 1 - sum(wrong.values()) / n, "wrong": wrong, "questions": total}


def colours_of(split: str) -> dict[int, str]:
    """Image id → the colour of its shape, from the colour questions' answers."""
    data = load_split(split)
    return {int(i): a for a, i in zip(data.answers, data.image_ids) if kind(a) == "colour"}


def colour_probe(model, n_train: int = 2000, n_test: int = 500, steps: int = 300) -> dict:
    """A linear softmax probe from the flattened bridge output to the shape's colour (train → test images)."""
    train, test = colours_of("train"), colours_of("test")
    names = sorted(set(train.values()))
    sets = []
    for split, labels, n in (("train", train, n_train), ("test", test, n_test)):
        ids = np.array(sorted(labels))[:n]
        x = bridge_prefix(model.bridge, cached_features(load_split(split))[ids]).flatten(1)
        sets.append((x, torch.tensor([names.index(labels[int(i)]) for i in ids])))
    (xtr, ytr), (xte, yte) = sets
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-4
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    torch.manual_seed(0)
    probe = torch.nn.Linear(xtr.shape[1], len(names))
    opt = torch.optim.Adam(probe.parameters(), 1e-3, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return {"train": float((probe(xtr).argmax(-1) == ytr).float().mean()),
                "test": float((probe(xte).argmax(-1) == yte).float().mean()), "colours": len(names)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600, help="questions per split for the per-type errors")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompter = Prompter(load_tokenizer(), candidate_answers())
    out = {}
    for role in ("device", "cloud"):
        model = load_pretrained(role)
        out[role] = {"train": errors_by_type(model, prompter, "train", args.n),
                     "test": errors_by_type(model, prompter, "test", args.n),
                     "colour_probe_on_bridge_output": colour_probe(model)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
