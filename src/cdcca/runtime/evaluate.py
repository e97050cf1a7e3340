"""Accuracy of a model on the task's test questions under one domain: direct answer and multiple choice."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from cdcca.data.easyvqa import VQASet
from cdcca.data.features import cached_features, image_set_features
from cdcca.data.jsonl import load_jsonl
from cdcca.data.stream import Domain
from cdcca.data.task import Task
from cdcca.model.answer import answer_batch, mc_predict
from cdcca.model.mllm import MLLM
from cdcca.model.prompt import Prompter, normalize_answer
from cdcca.model.spec import served_spec
from cdcca.trained_pair import active


def test_tokens(domain: Domain, seed: int = 0) -> torch.Tensor:
    """Visual tokens of all the served pair's test images under ``domain`` (cached on disk, and in memory so
    per-round evaluation does not re-read 125 MB per domain). Callers index it; never modify it in place."""
    return _test_tokens(active().task, domain, seed, served_spec().encoder)


@lru_cache(maxsize=8)
def _test_tokens(task: Task, domain: Domain, seed: int, encoder: str) -> torch.Tensor:   # encoder: part of the key
    return cached_features(task.split("test"), domain.corruption, domain.severity, seed)


_DOMAIN_TOKENS: dict[tuple, torch.Tensor] = {}


def domain_tokens(domain: Domain, data: VQASet) -> torch.Tensor:
    """Per-image tokens of a stream's data under ``domain`` (rows of other sources are zeros): the
    built-in domains' cached easy-VQA tokens, or a file domain's own images (cached by content)."""
    key = (str(domain), active().root, served_spec().encoder, len(data.images), tuple(sorted(data.sources.items())))
    if key in _DOMAIN_TOKENS:
        return _DOMAIN_TOKENS[key]
    if domain.path is None:
        base = test_tokens(domain)
        if len(base) == len(data.images):
            return base
        out = torch.zeros(len(data.images), *base.shape[1:], dtype=base.dtype)
        out[:len(base)] = base
    else:

        start, end = data.sources[domain.path]
        own = image_set_features(data.images[start:end])       # the merged data holds the file's images
        out = torch.zeros(len(data.images), *own.shape[1:], dtype=own.dtype)
        out[start:end] = own
    if len(_DOMAIN_TOKENS) >= 8:
        _DOMAIN_TOKENS.pop(next(iter(_DOMAIN_TOKENS)))
    _DOMAIN_TOKENS[key] = out
    return out


@torch.no_grad()
def accuracy(model: MLLM, prompter: Prompter, data: VQASet, question_ids: np.ndarray, tokens: torch.Tensor,
             batch_size: int = 64, direct: bool = True) -> dict:
    """``{"n", "da", "mc"}`` over the given questions; ``tokens`` are per image of ``data``."""
    da = mc = 0
    for start in range(0, len(question_ids), batch_size):
        ids = question_ids[start:start + batch_size]
        qs = [data.questions[i] for i in ids]
        gold = [data.answers[i] for i in ids]
        toks = tokens[data.image_ids[ids]]
        if direct:
            answers = answer_batch(model, prompter, toks, qs)
            da += sum(a.text == normalize_answer(g) for a, g in zip(answers, gold))     # both sides normalised
            mc += sum(a.mc == g for a, g in zip(answers, gold))
        else:
            probs = mc_predict(model, prompter, toks, qs)
            mc += sum(prompter.candidates[int(p)] == g for p, g in zip(probs.argmax(-1), gold))
    n = len(question_ids)
    return {"n": n, "da": da / n if direct else None, "mc": mc / n}


def evaluate_file(model: MLLM, tokenizer, path, n: int | None = None, direct: bool = True) -> dict:
    """``{"data", "n", "da", "mc"}`` of a model on every row (or the first ``n``) of a VQA JSONL file;
    multiple choice is over the served pair's answers (a file with other answers is refused)."""

    data = load_jsonl(path)
    active().check_answers(data.candidates, str(path))
    prompter = Prompter(tokenizer, active().answers)
    qids = np.arange(len(data.questions) if n is None else min(n, len(data.questions)))
    return {"data": str(path), **accuracy(model, prompter, data, qids, image_set_features(data.images), direct=direct)}
