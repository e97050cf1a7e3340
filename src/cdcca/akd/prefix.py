"""Prefix distillation: the device's bridge learns the cloud's robust visual prefix, translated.

The cloud's bridge was trained to give corrupted tokens the prefix it gives clean ones
(:mod:`cdcca.recipes.consistency`); the device's bridge was not. Both bridges feed the same kind of LLM input (a
``Q × d`` prefix), so a linear map fitted on *clean source images* — the cloud's prefix in, the
device's own source prefix out — translates what the teacher sees into the device's language.
Fed straight into the device, the translated prefix of a shifted upload answers about as well as
the cloud itself (docs/notebook.md §0.5). Training the device's bridge to produce that prefix from the
uploaded tokens passes the robustness on without any label, so every upload counts (no gate), and
without an LLM pass, so it costs a few seconds per round on a CPU. The device's own clean prefix
on source images is the anchor that keeps the source domain where it was.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from cdcca.akd.config import PREFIX_GROUPS
from cdcca.akd.interrupt import StopCheck, check
from cdcca.metrics import cosine
from cdcca.model.bridge import Bridge


@dataclass
class PrefixMap:
    """``y = [x, 1] @ weight``: teacher prefix vectors (…, d_t) → device prefix vectors (…, d_s), any widths.

    When the two bridges have different query counts, the teacher's prefix is first resampled along the
    query axis to the device's count (linear interpolation); equal counts (the default) need no resampling
    and distil better."""

    weight: torch.Tensor        # (d_t + 1, d_s) fp32
    n_query: int                # the device's query count

    @classmethod
    def fit(cls, teacher_prefix: torch.Tensor, device_prefix: torch.Tensor, ridge: float) -> PrefixMap:
        """Ridge regression over every (image, query) pair; one map shared by the query positions."""
        n_query, dev = device_prefix.shape[-2], device_prefix.device
        # solved in float64 on the CPU: not every accelerator has float64 (MPS), and the system is small
        x = resample_queries(teacher_prefix, n_query).reshape(-1, teacher_prefix.shape[-1]).cpu().double()
        y = device_prefix.reshape(-1, device_prefix.shape[-1]).cpu().double()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        gram = xa.T @ xa + ridge * torch.eye(xa.shape[1], dtype=x.dtype)
        return cls(torch.linalg.solve(gram, xa.T @ y).float().to(dev), n_query)

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        x = resample_queries(prefix.float(), self.n_query)
        return torch.cat([x, torch.ones(*x.shape[:-1], 1, device=x.device)], -1) @ self.weight


def resample_queries(prefix: torch.Tensor, n_query: int) -> torch.Tensor:
    """(N, Q_t, d) → (N, n_query, d) by linear interpolation along the query axis (as is when Q_t = n_query)."""
    if prefix.shape[-2] == n_query:
        return prefix
    return torch.nn.functional.interpolate(prefix.float().transpose(-1, -2), size=n_query, mode="linear",
                                           align_corners=True).transpose(-1, -2)


@torch.no_grad()
def bridge_prefix(bridge: Bridge, tokens: torch.Tensor, keep: torch.Tensor | None = None,
                  batch_size: int = 256) -> torch.Tensor:
    """The bridge's output (N, Q, d) in eval mode, batched (its training mode is restored after)."""
    was_training = bridge.training
    bridge.eval()
    try:
        out = [bridge(tokens[s:s + batch_size].float(), None if keep is None else keep[s:s + batch_size])
               for s in range(0, len(tokens), batch_size)]
    finally:
        bridge.train(was_training)
    return torch.cat(out)


@dataclass
class PrefixTeacher:
    """What the cloud fixes once per source model: the map and the device's clean source prefix."""

    map: PrefixMap
    source_tokens: torch.Tensor      # (N_images, P, C) fp16 clean source tokens
    anchors: torch.Tensor            # (N_images, Q, d_s) fp16: the source device's bridge on them
    scale: float                     # mean square of the anchors: losses are relative to it

    @classmethod
    def fit(cls, teacher_bridge: Bridge, device_bridge: Bridge, source_tokens: torch.Tensor,
            ridge: float) -> PrefixTeacher:
        anchors = bridge_prefix(device_bridge, source_tokens)
        pmap = PrefixMap.fit(bridge_prefix(teacher_bridge, source_tokens), anchors, ridge)
        return cls(pmap, source_tokens, anchors.half(), float(anchors.pow(2).mean()))


# which bridge parameters prefix distillation moves: all of them, or only the input side (token
# LayerNorm, input projection, position table; ~0.33 M entries) so that the update is small


def relative_mse(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    return (pred - target.float()).pow(2).mean() / scale


class _ChangeOnSpan(nn.Module):
    """token_proj.weight = W₀ + (W − W₀)·A·B: the round's change acts through the span A·B only."""

    def __init__(self, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base, self.a, self.b = base, a, b

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.base + ((weight - self.base) @ self.a) @ self.b


@contextmanager
def change_on_span(bridge: Bridge, span: tuple[torch.Tensor, torch.Tensor] | None):
    """While training, confine the change of ``bridge.token_proj.weight`` to ``span`` = (A, B); on exit the
    weight keeps its confined value. None: a free change."""
    if span is None:
        yield
        return
    base = bridge.token_proj.weight.detach().clone()
    a, b = (t.to(base) for t in span)
    parametrize.register_parametrization(bridge.token_proj, "weight", _ChangeOnSpan(base, a, b))
    try:
        yield
    finally:
        parametrize.remove_parametrizations(bridge.token_proj, "weight", leave_parametrized=True)


def train_prefix(bridge: Bridge, teacher: PrefixTeacher, tokens: torch.Tensor, keep: torch.Tensor,
                 targets: torch.Tensor, *, epochs: int, batch_size: int, lr: float, source_ratio: float,
                 grad_clip: float, rng: random.Random, group: str = "all",
                 span: tuple[torch.Tensor, torch.Tensor] | None = None,
                 should_stop: StopCheck | None = None) -> dict[str, float]:
    """Fit ``bridge`` so that bridge(tokens, keep) ≈ targets, anchored on clean source images.

    ``targets`` are translated teacher prefixes (N, Q, d_s). Each step also draws ``source_ratio``
    clean source images per sample and pulls their prefix towards the source device's own. Only
    the bridge's parameters of ``group`` (:data:`PREFIX_GROUPS`) move; ``span`` (A, B) confines the change
    of its token projection to W₀ + ΔW·A·B (:func:`change_on_span`: uploads that reached the cloud in a
    code, see :func:`~cdcca.uplink.codec.code_span_factors`); ``should_stop``: asked before every step
    (:mod:`cdcca.akd.interrupt`). Returns the mean of each loss term and the number of steps."""
    with change_on_span(bridge, span):
        return _train(bridge, teacher, tokens, keep, targets, epochs=epochs, batch_size=batch_size, lr=lr,
                      source_ratio=source_ratio, grad_clip=grad_clip, rng=rng, group=group, should_stop=should_stop)


def _train(bridge: Bridge, teacher: PrefixTeacher, tokens: torch.Tensor, keep: torch.Tensor,
           targets: torch.Tensor, *, epochs: int, batch_size: int, lr: float, source_ratio: float,
           grad_clip: float, rng: random.Random, group: str, should_stop: StopCheck | None = None) -> dict[str, float]:
    named = list(bridge.named_parameters())
    flags = [p.requires_grad for _, p in named]
    for name, p in named:
        p.requires_grad_(PREFIX_GROUPS[group](name))
    params = [p for _, p in named if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = len(tokens)
    steps = epochs * math.ceil(n / batch_size)
    totals = {"prefix": 0.0, "prefix_source": 0.0}
    bridge.train()
    step = 0
    try:
        for _ in range(epochs):
            order = list(range(n))
            rng.shuffle(order)
            for s in range(0, n, batch_size):
                check(should_stop)
                idx = order[s:s + batch_size]
                for g in opt.param_groups:
                    g["lr"] = cosine(lr, 0.0, step / max(1, steps))
                loss_up = relative_mse(bridge(tokens[idx].float(), keep[idx]), targets[idx], teacher.scale)
                loss = loss_up
                if source_ratio > 0:
                    src = [rng.randrange(len(teacher.source_tokens)) for _ in range(max(1, round(len(idx) * source_ratio)))]
                    loss_src = relative_mse(bridge(teacher.source_tokens[src].float()), teacher.anchors[src], teacher.scale)
                    loss = loss + loss_src
                    totals["prefix_source"] += loss_src.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                totals["prefix"] += loss_up.item()
                step += 1
    finally:
        bridge.eval()
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)
    return {**{k: v / max(1, step) for k, v in totals.items()}, "prefix_steps": float(step)}
