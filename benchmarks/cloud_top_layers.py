"""A negative result kept reproducible: fine-tune only the cloud's top decoder layers (their LoRA and
norms) on cached hidden states — ~5× cheaper per step than end-to-end on a CPU — to see whether the
teacher's clean accuracy is a read-out problem::

    PYTHONPATH=src python benchmarks/cloud_top_layers.py --split-layer 24 --samples 2048 --epochs 2 --lr 3e-4

Measured (docs/RESULTS.md §0.7): clean MC 0.893 → 0.878 on 600 test questions, so it is not; the colour
is already missing from the cloud bridge's output (benchmarks/teacher_diagnosis.py).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cdcca.assets import load_tokenizer
from cdcca.data.easyvqa import candidate_answers, load_split
from cdcca.data.features import cached_features
from cdcca.model.mllm import is_adapter_key
from cdcca.model.pair import load_pretrained
from cdcca.model.prompt import Prompter
from cdcca.pretrain import random_keep


class SplitCloud:
    """The pretrained cloud cut after decoder layer ``split``: the lower part runs once, frozen."""

    def __init__(self, split: int):
        self.model = load_pretrained("cloud")
        self.split = split
        self.layers = self.model.core.layers
        self.lower, self.upper = nn.ModuleList(self.layers[:split]), nn.ModuleList(self.layers[split:])

    @torch.no_grad()
    def lower_pass(self, tokens, keep, text) -> tuple[torch.Tensor, int]:
        self.model.core.layers = self.lower
        try:
            fwd = self.model(tokens, keep, text.input_ids, text.attention_mask)
        finally:
            self.model.core.layers = self.layers
        return fwd.hidden.half(), fwd.n_visual

    def upper_pass(self, hidden, n_visual, text) -> torch.Tensor:
        mask = torch.cat([text.attention_mask.new_ones(len(hidden), n_visual), text.attention_mask], 1)
        self.model.core.layers = self.upper
        try:
            return self.model.core(inputs_embeds=hidden.float(), attention_mask=mask,
                                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        finally:
            self.model.core.layers = self.layers

    def trainable(self) -> list[nn.Parameter]:
        def upper(name: str) -> bool:
            return ".layers." not in name or int(name.split(".layers.")[1].split(".")[0]) >= self.split
        return [p for n, p in self.model.named_parameters() if is_adapter_key(n) and not n.startswith("bridge.") and upper(n)]


def test_mc(net: SplitCloud, prompter: Prompter, data, ids, tokens) -> float:
    right = 0
    with torch.no_grad():
        for s in range(0, len(ids), 64):
            b = ids[s:s + 64]
            text = prompter.batch([data.questions[i] for i in b])
            normed = net.upper_pass(*net.lower_pass(tokens[data.image_ids[b]].float(), None, text), text)
            picks = net.model.logits(normed[:, -1])[:, prompter.candidate_first_ids].argmax(-1)
            right += sum(prompter.candidates[int(k)] == data.answers[i] for i, k in zip(b, picks))
    return right / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split-layer", type=int, default=24)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    net, prompter = SplitCloud(args.split_layer), Prompter(load_tokenizer(), candidate_answers())
    train, test = load_split("train"), load_split("test")
    clean, rng, gen = cached_features("train"), np.random.default_rng(0), torch.Generator().manual_seed(0)
    net.model.eval()
    cache = []
    for _ in range(0, args.samples, 32):
        q = rng.integers(0, len(train), 32)
        keep = random_keep(32, clean.shape[1], (0.25, 1.0), gen)
        keep[torch.rand(32, generator=gen) >= 0.5] = True
        text = prompter.batch([train.questions[i] for i in q], [train.answers[i] for i in q])
        cache.append((*net.lower_pass(clean[train.image_ids[q]].float(), keep, text), text))
    ids, test_tokens = np.random.default_rng(1).choice(len(test), 600, replace=False), cached_features("test")
    before = test_mc(net, prompter, test, ids, test_tokens)
    params = net.trainable()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps, t0 = args.epochs * len(cache), time.perf_counter()
    for step, j in enumerate(j for _ in range(args.epochs) for j in rng.permutation(len(cache))):
        hidden, n_visual, text = cache[j]
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1, (step + 1) / (0.1 * steps)) * 0.5 * (1 + np.cos(np.pi * step / steps))
        normed = net.upper_pass(hidden, n_visual, text)[:, n_visual:]
        target = text.labels[:, 1:]
        sel = target != -100
        loss = F.cross_entropy(net.model.logits(normed[:, :-1][sel]).float(), target[sel])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    net.model.eval()
    print({"clean_mc_before": before, "clean_mc_after": test_mc(net, prompter, test, ids, test_tokens),
           "s_per_step": round((time.perf_counter() - t0) / steps, 2), "trainable": sum(p.numel() for p in params)})


if __name__ == "__main__":
    main()
