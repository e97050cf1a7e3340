"""An in-process round driver: device stream → UTS uplink → AKD → adapter update → device.

No state on disk and no fleet: it measures the algorithms (and their ablations) quickly. The
update is either the dense fp32 adapter state or a DWC packet; the packets are real bytes either
way. The system runtimes (:mod:`cdcca.device`, :mod:`cdcca.cloud`) persist the same steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from cdcca.adapter_state import clone_state, state_hash
from cdcca.data.easyvqa import VQASet
from cdcca.data.stream import Domain, build_stream, heldout_questions, resolve_sequence
from cdcca.distill import AKD, AKDConfig, with_true_labels
from cdcca.downlink import DWCConfig, apply_delta, build_resync, build_update, decode_update
from cdcca.evaluate import accuracy, test_tokens
from cdcca.model.answer import answer_all
from cdcca.model.mllm import MLLM, adapter_state, load_adapter_state
from cdcca.model.prompt import Prompter
from cdcca.uplink import UTSConfig, build_uplink, decode_uplink, plan_uplink
from cdcca.wire import decode


@dataclass
class LoopConfig:
    """One continual-adaptation run over a shift stream."""

    stream: str = "default"
    per_domain: int = 320          # stream requests per domain
    rounds_per_domain: int = 1
    heldout_n: int = 300           # held-out questions per domain for per-round accuracy
    answer_batch: int = 64
    downlink: str = "dense"        # "dense" (fp32 state) | "dwc" (compressed update) | "none" (source-only)
    labels: str = "teacher"        # "teacher" (pseudo-labels) | "oracle" (the true answers of the same uploads)
    uts: UTSConfig = field(default_factory=lambda: UTSConfig(selection="budget", budget=160))
    akd: AKDConfig = field(default_factory=AKDConfig)
    dwc: DWCConfig = field(default_factory=DWCConfig)
    eval_every_round: bool = True  # held-out accuracy after every round (else after the last only)
    save_states: str | None = None # folder to save the device's adapter state after each round
    seed: int = 0

    def __post_init__(self):
        if self.downlink not in ("dense", "dwc", "none"):
            raise ValueError(f"LoopConfig.downlink must be dense, dwc or none; got {self.downlink!r}")
        if self.labels not in ("teacher", "oracle"):
            raise ValueError(f"LoopConfig.labels must be teacher or oracle; got {self.labels!r}")


PRESETS = {
    "quick": dict(per_domain=320, rounds_per_domain=1, heldout_n=300),
    "tiny": dict(per_domain=32, rounds_per_domain=1, heldout_n=32),
    "paper": dict(per_domain=1000, rounds_per_domain=2, heldout_n=1000),
}


def preset(name: str, **overrides) -> LoopConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return LoopConfig(**{**PRESETS[name], **overrides})


def heldout_mc(model: MLLM, prompter: Prompter, data: VQASet, domains: list[Domain], n: int) -> dict[str, float]:
    qids = heldout_questions(data, n)
    return {str(d): accuracy(model, prompter, data, qids, test_tokens(d), direct=False)["mc"] for d in domains}


def run_loop(cfg: LoopConfig, device: MLLM, akd: AKD, prompter: Prompter, data: VQASet,
             on_round=None, device_id: str = "device-0") -> dict:
    """Run every round of ``cfg.stream``; returns {"rounds": [...], "summary": {...}}."""
    domains = resolve_sequence(cfg.stream)
    chunks = build_stream(data, domains, cfg.per_domain, cfg.rounds_per_domain, cfg.seed)
    clean = Domain("clean", 0)
    state = clone_state(adapter_state(device))
    residual = None
    version = 0
    rounds = []
    t_start = time.perf_counter()
    for chunk in chunks:
        t0 = time.perf_counter()
        toks_all = test_tokens(chunk.domain)
        qids = chunk.question_ids
        questions = [data.questions[i] for i in qids]
        tokens = toks_all[data.image_ids[qids]].float()
        answers = answer_all(device, prompter, tokens, questions, cfg.answer_batch, cfg.uts.temperature)
        online_mc = float(np.mean([a.mc == data.answers[i] for a, i in zip(answers, qids)]))
        ids = [f"r{chunk.round}-q{i}" for i in qids]
        row = {"round": chunk.round, "device": device_id, "domain": str(chunk.domain), "online_mc": online_mc,
               "uploads": 0, "bytes_up": 0, "bytes_down": 0}
        if cfg.downlink != "none":
            samples = plan_uplink(tokens, questions, answers, ids, cfg.uts, bridge=device.bridge)
            if samples:
                packet = build_uplink(samples, cfg.uts, device_id=device_id, adapter_version=str(version))
                up = decode_uplink(packet)
                t1 = time.perf_counter()
                records = akd.teacher_pass(up.tokens, up.keep, up.questions, up.sample_ids)
                teacher_s = time.perf_counter() - t1
                truth = [data.answers[int(sid.split("-q")[1])] for sid in up.sample_ids]
                oracle = cfg.labels == "oracle"          # the oracle trains on every upload: no teacher gate applies
                trained = upload_accuracy(records, up.mc, truth, 0.0 if oracle else akd.cfg.min_teacher_confidence)
                if oracle:
                    records = with_true_labels(records, truth, prompter.candidates)
                new_state, st = akd.distill(device_id, state, records, device_answers=up.mc)
                pseudo_acc = float(np.mean([r.pseudo_label == t for r, t in zip(records, truth)]))
                if cfg.downlink == "dense":
                    down = build_resync(new_state, device_id=device_id, version=version + 1)
                    state = {k: v.clone() for k, v in new_state.items()}
                else:
                    down, mirror, residual, _ = build_update(state, new_state, residual, cfg.dwc, device_id=device_id,
                                                             base_version=version, new_version=version + 1, round=chunk.round)
                    state = apply_delta(state, decode_update(decode(down, expect_kind="update")))
                    assert state_hash(state) == state_hash(mirror)
                version += 1
                load_adapter_state(device, state)
                row.update(uploads=len(samples), bytes_up=len(packet), bytes_down=len(down), teacher_s=round(teacher_s, 2),
                           student_s=round(st.student_s, 2), samples_per_s=round(st.samples_per_s, 2),
                           pseudo_label_acc=pseudo_acc, losses=st.losses, replayed=st.replayed, **trained)
        if cfg.save_states:
            Path(cfg.save_states).mkdir(parents=True, exist_ok=True)
            save_file(state, str(Path(cfg.save_states) / f"round{chunk.round}.safetensors"))
        if cfg.eval_every_round or chunk is chunks[-1]:
            row["heldout"] = heldout_mc(device, prompter, data, domains, cfg.heldout_n)
            row["heldout_mc"] = float(np.mean(list(row["heldout"].values())))
            row["source_mc"] = heldout_mc(device, prompter, data, [clean], cfg.heldout_n)["clean"]
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rounds.append(row)
        if on_round:
            on_round(row)
    last = rounds[-1]
    summary = {"adapted_mc": last["heldout_mc"], "source_mc": last["source_mc"], "heldout": last["heldout"],
               "bytes_up_total": sum(r["bytes_up"] for r in rounds), "bytes_down_total": sum(r["bytes_down"] for r in rounds),
               "wall_s": round(time.perf_counter() - t_start, 1), "config": _jsonable(asdict(cfg))}
    return {"rounds": rounds, "summary": summary}


def upload_accuracy(records, device_answers: list[str], truth: list[str], min_confidence: float) -> dict:
    """Teacher vs device MC accuracy on the uploads AKD trains on (after the teacher-confidence gate)."""
    kept = [i for i, r in enumerate(records) if r.confidence >= min_confidence]
    if not kept:
        return {"trained": 0, "upload_teacher_mc": None, "upload_device_mc": None}
    return {"trained": len(kept),
            "upload_teacher_mc": float(np.mean([records[i].pseudo_label == truth[i] for i in kept])),
            "upload_device_mc": float(np.mean([device_answers[i] == truth[i] for i in kept]))}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
