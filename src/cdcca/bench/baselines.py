"""Device-only baselines on the same stream, evaluation and seeds as the collaborative loop.

:func:`run_device_only` walks the stream chunk by chunk as :mod:`cdcca.bench.loop` does, but the device
adapts alone (TENT, EATA, CoTTA, encoder BatchNorm re-estimation, or TENT on top of it): each batch
of requests is answered and adapted on in one go, and nothing leaves the device. The true answers of
the stream are used only to score what the device answered. The result has :func:`cdcca.bench.loop.run_loop`'s
shape, so every bench reads both alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cdcca.bench.loop import heldout_mc, loop_summary, measure_heldout
from cdcca.config import RunConfig, apply
from cdcca.data.corruptions import corrupt
from cdcca.data.easyvqa import VQASet
from cdcca.data.scenario import stream_spec
from cdcca.data.stream import Domain, heldout_questions, resolve_sequence
from cdcca.fleet.traffic import SimulatedTraffic
from cdcca.model.answer import mc_predict
from cdcca.model.encoder import load_encoder
from cdcca.model.mllm import MLLM, is_adapter_key
from cdcca.model.prompt import Prompter
from cdcca.tta import EATA, CoTTA, CoTTAConfig, EATAConfig, EncoderStats, Tent, TentConfig

METHODS = ("bn", "tent", "tent+bn", "eata", "cotta")
RATE_GROUP = {"tent": "tent", "tent+bn": "tent", "eata": "eata", "cotta": "cotta"}   # method → its optimiser's config


@dataclass
class BaselineConfig:
    """Which device-only method, with what settings; ``batch`` requests per adaptation step."""

    method: str = field(default="tent", metadata={"help": "bn | tent | tent+bn | eata | cotta"})
    batch: int = field(default=32, metadata={"help": "requests per adaptation step"})
    tent: TentConfig = field(default_factory=TentConfig, metadata={"help": "TENT's optimiser settings (also tent+bn's)"})
    eata: EATAConfig = field(default_factory=EATAConfig, metadata={"help": "EATA's settings"})
    cotta: CoTTAConfig = field(default_factory=CoTTAConfig, metadata={"help": "CoTTA's settings"})
    bn_images_per_round: int = field(default=64, metadata={"help": "images folded into the encoder statistics per round"})
    bn_source_weight: float = field(default=0.0, metadata={"help": (
        "prior on the source statistics (0: replace them, TENT's test-time BN)")})

    def settings(self) -> dict:
        """The settings this method uses (what a finished benchmark cell is checked against)."""
        from dataclasses import asdict

        out: dict = {"method": self.method, "batch": self.batch}
        group = RATE_GROUP.get(self.method)
        if group:
            out[group] = asdict(getattr(self, group))
        if self.method.endswith("bn"):
            out.update(bn_images_per_round=self.bn_images_per_round, bn_source_weight=self.bn_source_weight)
        return out

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown device-only method {self.method!r}; choose from {', '.join(METHODS)}")


def build_method(cfg: BaselineConfig, model: MLLM, prompter: Prompter, source=None):
    """The online TTA method a baseline runs on the LLM side (None for BatchNorm re-estimation alone)."""
    if cfg.method in ("tent", "tent+bn"):
        return Tent(model, prompter, cfg.tent)
    if cfg.method == "eata":
        return EATA(model, prompter, source, cfg.eata)
    if cfg.method == "cotta":
        return CoTTA(model, prompter, cfg.cotta)
    return None


class EncodedStream:
    """The device's tokens under re-estimated encoder statistics: per round it folds a sample of the
    round's images into the statistics, then re-encodes what it answers; held-out tokens likewise."""

    def __init__(self, data: VQASet, images_per_round: int, seed: int, source_weight: float = 0.0):

        self.data, self.per_round, self.seed = data, images_per_round, seed
        self.stats = EncoderStats(load_encoder(), source_weight=source_weight)

    def _images(self, domain: Domain, image_ids: np.ndarray) -> np.ndarray:

        return corrupt(self.data.images[image_ids], domain.corruption, domain.severity, seed=self.seed)

    def round_tokens(self, domain: Domain, question_ids: np.ndarray) -> torch.Tensor:
        images = np.unique(self.data.image_ids[question_ids])
        rng = np.random.default_rng(self.seed)
        self.stats.observe(self._images(domain, rng.permutation(images)[:self.per_round]))
        return self.tokens_for(domain, images)[self.data.image_ids[question_ids]].float()

    def tokens_for(self, domain: Domain, images: np.ndarray) -> torch.Tensor:
        """Per-image tokens (n_images, P, C) with rows filled for ``images`` only."""
        enc = self.stats.encode(self._images(domain, images))
        out = torch.zeros(len(self.data.images), *enc.shape[1:], dtype=enc.dtype)
        out[torch.as_tensor(images)] = enc
        return out

    def heldout_tokens(self, n: int):

        images = np.unique(self.data.image_ids[heldout_questions(self.data, n)])
        return lambda domain: self.tokens_for(domain, images)


def run_device_only(cfg: RunConfig, base: BaselineConfig, model: MLLM, prompter: Prompter, data: VQASet,
                    source=None, on_round=None) -> dict:
    """Serve the stream with a device-only method; rows and summary as :func:`cdcca.bench.loop.run_loop` returns."""
    domains = resolve_sequence(cfg.data.domains)
    scenario = cfg.scenario
    traffic = SimulatedTraffic({**stream_spec(cfg.data.domains, scenario, cfg.seed), "device_id": "device-0"})
    slots = scenario.schedule(domains)
    torch.manual_seed(cfg.seed)
    method = build_method(base, model, prompter, source)
    encoded = (EncodedStream(data, base.bn_images_per_round, cfg.seed, base.bn_source_weight)
               if base.method.endswith("bn") else None)
    rounds, t_start = [], time.perf_counter()
    n_rounds = len(slots)
    for rnd, slot in enumerate(slots):
        t0 = time.perf_counter()
        tokens, questions, gold, ids, domain = traffic.chunk(rnd)
        if encoded is not None:
            qids = np.array([int(i.rsplit("-q", 1)[1]) for i in ids])
            tokens = encoded.round_tokens(Domain.parse(domain), qids)
        picks = serve(method, model, prompter, tokens, questions, base.batch)
        correct = [prompter.candidates[p] == g for p, g in zip(picks, gold)]
        row = {"round": rnd, "device": "device-0", "domain": domain, "uploads": 0, "bytes_up": 0, "bytes_down": 0,
               "online_mc": float(np.mean(correct)), "correct": correct,
               "adapted_samples": getattr(method, "updates", 0), "visit": slot.visit, "step": slot.step}
        n = cfg.eval.heldout_n if rnd == n_rounds - 1 else cfg.eval.curve_n
        if n:
            tokens_of = encoded.heldout_tokens(n) if encoded is not None else None
            measure_heldout(row, getattr(method, "predictor", model), prompter, data, scenario.domains(domains),
                            n, cfg.eval.heldout_da,
                            **({"tokens_of": tokens_of} if tokens_of else {}))
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rounds.append(row)
        if on_round:
            on_round(row)
    for name, p in model.named_parameters():          # back to the model's own trainable set
        p.requires_grad_(is_adapter_key(name))
    return {"rounds": rounds, "summary": loop_summary(rounds, cfg, time.perf_counter() - t_start)}


def serve(method, model: MLLM, prompter: Prompter, tokens: torch.Tensor, questions: list[str], batch: int) -> list[int]:
    """Answer a chunk ``batch`` requests at a time, adapting on each batch as it is answered; the
    candidate indices picked. It takes no answers: a device-only method cannot see one."""

    picks: list[int] = []
    for s in range(0, len(questions), batch):
        toks, qs = tokens[s:s + batch], questions[s:s + batch]
        probs = mc_predict(model, prompter, toks, qs) if method is None else method.step(toks, qs)
        picks += probs.argmax(-1).tolist()
    return picks


def tune_rate(method: str, rates: list[float], models, per_domain: int = 320, heldout_n: int = 200,
              tolerance: float = 0.01, on_result=None) -> dict:
    """Pick a device-only method's learning rate on the **source domain only**: run it over a clean
    stream at each rate and keep the largest rate whose held-out clean MC stays within ``tolerance``
    of the unadapted model's (entropy minimisation on data it already knows must not hurt it). No
    shifted image and no stream answer is involved in the choice."""
    with_rate(method, rates[0])                      # fails before any run for a method without a rate
    cfg = apply(RunConfig(), {"data.domains": "clean", "stream.scenario": "one-round", "stream.round_size": per_domain,
                              "eval.heldout_n": heldout_n})
    reference = measure_clean(models.fresh_device(), models.prompter, models.data, heldout_n)
    rows = []
    for lr in rates:
        base = with_rate(method, lr)
        res = run_device_only(cfg, base, models.fresh_device(), models.prompter, models.data,
                              source=models.source_set() if method == "eata" else None)
        rows.append({"method": method, "lr": lr, "clean_mc": res["summary"]["source_mc"],
                     "drop": reference - res["summary"]["source_mc"]})
        if on_result:
            on_result(rows[-1])
    ok = [r["lr"] for r in rows if r["drop"] <= tolerance]
    return {"method": method, "reference_clean_mc": reference, "tolerance": tolerance, "rows": rows,
            "chosen_lr": max(ok) if ok else min(rates)}


def with_rate(method: str, lr: float) -> BaselineConfig:
    """A baseline's config with its optimiser's learning rate set (BatchNorm re-estimation has none)."""
    group = RATE_GROUP.get(method)
    if group is None:
        raise ValueError(f"{method!r} has no learning rate to tune; choose tent, tent+bn, eata or cotta")
    base = BaselineConfig(method=method)
    return replace(base, **{group: replace(getattr(base, group), lr=lr)})


def measure_clean(model: MLLM, prompter: Prompter, data: VQASet, n: int) -> float:

    return heldout_mc(model, prompter, data, [Domain("clean", 0)], n)["clean"]
