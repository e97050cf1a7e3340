"""Sample scorers (``Answer -> uncertainty``, higher = more uncertain) and the per-round choice of
which samples leave the device; the score decides what the cloud gets to correct."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from cdcca.model.answer import Answer, mc_predict
from cdcca.uplink.config import UTSConfig
from cdcca.uplink.packet import PACKET_OVERHEAD
from cdcca.uplink.tokens import TokenStats, _check_tokens, score_ood, select_tokens


def score_confidence(a: Answer) -> float:
    """1 − Π_t max_v p_t(v): the authors' rule (their confidence is the product of step max-probs)."""
    return 1.0 - float(a.confidence)


def score_entropy(a: Answer) -> float:
    """Mean per-step token entropy of the generated answer, in nats (0 for an empty answer)."""
    return float(np.mean(a.entropies)) if a.entropies else 0.0


def score_margin(a: Answer) -> float:
    """1 − (p(top1) − p(top2)) at the first answer step."""
    return 1.0 - float(a.margin)


def score_mc_disagreement(a: Answer) -> float:
    """1 − max candidate probability: the device's own probability that its MC answer is wrong.

    The softmax over the 13 candidates' first tokens ignores probability mass on tokens that are no
    answer at all (which dominates Π max-prob on a shifted input), so it measures doubt *between
    answers* — the thing the cloud can fix.
    """
    return 1.0 - max(a.mc_probs) if a.mc_probs else 1.0


def score_mc_entropy(a: Answer) -> float:
    """Entropy of the candidate distribution divided by log(#candidates), in [0, 1]."""
    p = np.asarray(a.mc_probs, dtype=np.float64)
    if p.size < 2:
        return 1.0
    return float(-(p * np.log(np.clip(p, 1e-12, None))).sum() / math.log(p.size))


SAMPLE_SCORERS: dict[str, Callable[[Answer], float]] = {
    "confidence": score_confidence,
    "entropy": score_entropy,
    "margin": score_margin,
    "mc_disagreement": score_mc_disagreement,
    "mc_entropy": score_mc_entropy,
}


def sample_uncertainty(answers: Sequence[Answer], scorer: str = "mc_disagreement") -> list[float]:
    """One uncertainty per answer from an answer-only scorer of :data:`SAMPLE_SCORERS`."""
    if scorer == "view_consistency":
        raise ValueError("sample scorer 'view_consistency' needs the device model: use view_uncertainty(...) "
                         "or pass model= and prompter= to plan_uplink")
    if scorer not in SAMPLE_SCORERS:
        raise ValueError(f"unknown sample scorer {scorer!r}; choose from {', '.join(SAMPLE_SCORERS)}")
    return [SAMPLE_SCORERS[scorer](a) for a in answers]


@torch.no_grad()
def view_uncertainty(model: torch.nn.Module, prompter, tokens: torch.Tensor, questions: Sequence[str],
                     answers: Sequence[Answer], *, stats: TokenStats | None = None, keep_ratio: float = 0.5,
                     floor: float = 0.01, batch_size: int = 64) -> list[float]:
    """Two-view uncertainty: ``sqrt((1 − p1) · (1 − p_view))`` ∈ [0, 1].

    ``p1`` is the device's candidate probability of its own MC answer; ``p_view`` is the probability
    the device gives that same answer when it sees only the ``keep_ratio`` *least* out-of-distribution
    tokens (``ood`` scorer). An answer that leans on the shifted tokens changes under that view even
    when the device was sure of it — the confidently wrong answers (e.g. under pixelation) that no
    answer-only score can flag. Costs one extra MC forward (no generation) per request.
    """

    x = _check_tokens(tokens)
    keep = select_tokens(score_ood(x, stats=stats, floor=floor), keep_ratio, "least")
    out = []
    for s in range(0, len(questions), batch_size):
        probs = mc_predict(model, prompter, x[s:s + batch_size], list(questions[s:s + batch_size]),
                           keep=keep[s:s + batch_size])
        for a, p in zip(answers[s:s + batch_size], probs):
            p_view = float(p[prompter.candidates.index(a.mc)]) if a.mc in prompter.candidates else 0.0
            out.append(math.sqrt(max(0.0, score_mc_disagreement(a)) * max(0.0, 1.0 - p_view)))
    return out


def _nan_last_key(u: float) -> float:
    return math.inf if math.isnan(u) else u   # a NaN score counts as maximally uncertain


def select_samples(uncertainty: Sequence[float], cfg: UTSConfig, *,
                   costs: Sequence[int] | None = None) -> list[int]:
    """Indices (ascending) of the samples to upload this round.

    ``threshold``: uncertainty > cfg.threshold. ``budget``: the cfg.budget most uncertain (ties broken
    by index). ``bytes``: most uncertain first, as long as the running total of ``costs`` (bytes each
    sample adds to the packet, see :func:`sample_cost`) plus :data:`PACKET_OVERHEAD` fits
    cfg.byte_budget. NaN uncertainty counts as most uncertain.
    """
    u = [_nan_last_key(float(x)) for x in uncertainty]
    order = sorted(range(len(u)), key=lambda i: (-u[i], i))
    order = order[round(cfg.skip_top * len(u)):]     # the band policy leaves the most uncertain out
    if cfg.selection == "threshold":
        picked = [i for i in order if u[i] > cfg.threshold]
    elif cfg.selection == "budget":
        picked = order[: cfg.budget]
    else:
        if costs is None or len(costs) != len(u):
            raise ValueError("selection='bytes' needs one cost per sample (see sample_cost)")
        picked, total = [], PACKET_OVERHEAD
        for i in order:
            if total + costs[i] > cfg.byte_budget:
                break
            picked.append(i)
            total += costs[i]
    return sorted(picked)
