"""The benchmark driver: one device and the cloud over the continual shift stream, measured.

It runs exactly what ships — the device and cloud runtimes on scratch state dirs and the steps of
:mod:`cdcca.runtime.protocol` — and adds only measurement: held-out accuracy per domain after each round,
what the teacher and the device knew about the trained samples, timings. What a comparison run changes
is a :class:`Comparison`, apart from the run config: ``downlink`` ("dwc" as shipped, "dense" full fp32
state, "none" = source-only), ``labels`` ("oracle": the uploads' true answers replace the teacher's) and
``save_states``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from cdcca.akd.distill import AKD, with_true_labels
from cdcca.config import RunConfig, flatten
from cdcca.data.easyvqa import VQASet
from cdcca.data.scenario import after_shift, recovery_curve, revisit_first_rounds, stream_spec
from cdcca.data.stream import Domain, heldout_questions, resolve_sequence
from cdcca.fleet.local import LocalFleet
from cdcca.model.mllm import MLLM, adapter_state
from cdcca.model.prompt import Prompter
from cdcca.runtime.cloud import CloudRuntime, RoundStudy
from cdcca.runtime.device import DeviceRuntime
from cdcca.runtime.evaluate import accuracy, domain_tokens

DOWNLINKS = ("dense", "dwc", "none")      # the full fp32 state | the compressed update as shipped | source-only
LABELS = ("teacher", "oracle")            # pseudo-labels | the true answers of the same uploads


def heldout_mc(model: MLLM, prompter: Prompter, data: VQASet, domains: list[Domain], n: int) -> dict[str, float]:
    return {d: s["mc"] for d, s in heldout_scores(model, prompter, data, domains, n).items()}


def heldout_scores(model: MLLM, prompter: Prompter, data: VQASet, domains: list[Domain], n: int,
                   direct: bool = False, tokens_of=None) -> dict[str, dict]:
    """``{domain: {"n", "mc", "da"}}`` on each domain's fixed held-out questions; ``da`` only when
    ``direct``. ``tokens_of(domain)`` gives the per-image tokens (default: the frozen encoder's cached ones)."""
    tokens_of = tokens_of or (lambda d: domain_tokens(d, data))
    return {str(d): accuracy(model, prompter, data, heldout_questions(data, n, domain=d), tokens_of(d), direct=direct)
            for d in domains}


def measure_heldout(row: dict, model: MLLM, prompter: Prompter, data: VQASet, domains: list[Domain], n: int,
                    direct: bool, tokens_of=None) -> None:
    """Add held-out MC (and DA) per domain, their shifted-domain mean and clean MC to a round row."""
    shifted = [d for d in domains if d.corruption != "clean"]
    scores = heldout_scores(model, prompter, data, [*shifted, Domain("clean", 0)], n, direct, tokens_of)
    clean = scores.pop("clean")
    row["heldout"] = {d: s["mc"] for d, s in scores.items()}
    row["heldout_mc"] = float(np.mean(list(row["heldout"].values()))) if shifted else None
    row["source_mc"] = clean["mc"]
    if direct:
        row["heldout_da"] = {d: s["da"] for d, s in scores.items()}
        row["source_da"] = clean["da"]


@dataclass(frozen=True)
class Comparison:
    """What a benchmark run changes against the shipped loop, for comparison only."""

    downlink: str = "dense"          # see DOWNLINKS
    labels: str = "teacher"          # see LABELS
    save_states: str | None = None   # a folder for the device's adapter state after each round

    def __post_init__(self):
        if self.downlink not in DOWNLINKS:
            raise ValueError(f"downlink must be one of {', '.join(DOWNLINKS)}; got {self.downlink!r}")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {', '.join(LABELS)}; got {self.labels!r}")


def run_loop(cfg: RunConfig, device: MLLM, akd: AKD, prompter: Prompter, data: VQASet, how: Comparison = Comparison(),
             on_round=None, device_id: str = "device-0", workdir: str | Path | None = None) -> dict:
    """Run every round of ``cfg``'s stream through the runtimes and :mod:`cdcca.runtime.protocol`, as the
    demo and a deployment do, in a scratch state dir (``workdir``, default a temporary one);
    returns {"rounds": [...], "summary": {...}}."""
    if workdir is not None:
        return _run(cfg, how, device, akd, prompter, data, on_round, device_id, Path(workdir))
    with tempfile.TemporaryDirectory(prefix="cdcca-loop-") as tmp:
        return _run(cfg, how, device, akd, prompter, data, on_round, device_id, Path(tmp))


def _run(cfg: RunConfig, how: Comparison, device: MLLM, akd: AKD, prompter: Prompter, data: VQASet, on_round,
         device_id: str, root: Path) -> dict:
    domains = resolve_sequence(cfg.data.domains)
    scenario = cfg.scenario
    stream = stream_spec(cfg.data.domains, scenario, cfg.seed)
    dev = DeviceRuntime.create(root / "device", device_id, uts=cfg.uts, stream=stream, model=device)
    cloud = CloudRuntime(root / "cloud", akd, adapter_state(device), cfg.dwc,
                         downlink="dense" if how.downlink == "dense" else "dwc")
    # the rows report how often the teacher was right on the uploads; the oracle trains on their true answers
    relabel = None if how.labels != "oracle" else \
        (lambda records: with_true_labels(records, [_truth(data, r.sample_id) for r in records], prompter.candidates))
    study = RoundStudy(relabel=relabel, teacher_answers=True)
    fleet = LocalFleet(cfg, root, [dev], cloud)            # the embedded fleet's round, with one device
    rounds = []
    t_start = time.perf_counter()
    try:
        for rnd in range(len(fleet.slots)):
            row = fleet.run_round(rnd, study=study, serve_only=how.downlink == "none")[0]
            row.update(_trained(how, cloud, data, row["uploads"]))
            if how.save_states:
                Path(how.save_states).mkdir(parents=True, exist_ok=True)
                save_file(dev.store.current()[1], str(Path(how.save_states) / f"round{rnd}.safetensors"))
            n = cfg.eval.heldout_n if rnd == len(fleet.slots) - 1 else cfg.eval.curve_n
            if n:
                measure_heldout(row, dev.model, prompter, data, scenario.domains(domains), n, cfg.eval.heldout_da)
            rounds.append(row)
            if on_round:
                on_round(row)
    finally:
        fleet.close()
    return {"rounds": rounds, "summary": loop_summary(rounds, cfg, time.perf_counter() - t_start, how)}


def online_summary(rounds: list[dict]) -> dict:
    """What users got: online MC over the shifted rounds, the recovery curve, and (recurring) the
    first round of every later visit."""
    shifted = [r["online_mc"] for r in rounds if r["domain"] != "clean" and r.get("online_mc") is not None]
    out = {"online_mc": float(np.mean(shifted)) if shifted else None, "recovery": recovery_curve(rounds),
           "after_shift": after_shift(rounds)}
    revisit = revisit_first_rounds(rounds)
    if revisit is not None:
        out["revisit_first_round_mc"] = revisit
    return out


def loop_summary(rounds: list[dict], cfg: RunConfig, wall_s: float, how: Comparison = Comparison()) -> dict:
    """The run's summary from its rounds: online accuracy, the last round's held-out scores, the bytes moved."""
    last = rounds[-1]
    summary = {**online_summary(rounds), "adapted_mc": last["heldout_mc"], "source_mc": last["source_mc"],
               "heldout": last["heldout"], "bytes_up_total": sum(r["bytes_up"] for r in rounds),
               "bytes_down_total": sum(r["bytes_down"] for r in rounds),
               "wall_s": round(wall_s, 1), "config": {**flatten(cfg), **asdict(how)}}
    if "heldout_da" in last:
        summary.update(heldout_da=last["heldout_da"],
                       adapted_da=float(np.mean(list(last["heldout_da"].values()))) if last["heldout_da"] else None,
                       source_da=last["source_da"])
    return summary


def _trained(how: Comparison, cloud: CloudRuntime, data: VQASet, uploads: int) -> dict:
    """What the cloud's round trained on: its time, and how often the teacher and the device were right."""
    report = cloud.last_round if uploads else None
    if report is None:
        return {}
    truth = [_truth(data, sid) for sid in report.sample_ids]
    akd_cfg = cloud.akd.cfg
    # the teacher-confidence gate applies to the label phase only: the oracle and prefix
    # distillation (which uses no answer) train on every upload
    gate = akd_cfg.labels.min_teacher_confidence if how.labels != "oracle" and akd_cfg.labels.epochs > 0 else 0.0
    st = report.stats
    return dict(teacher_s=round(report.teacher_s, 2), student_s=round(st.student_s, 2),
                samples_per_s=round(st.samples_per_s, 2), losses=st.losses, replayed=st.replayed,
                pseudo_label_acc=float(np.mean([r.pseudo_label == t for r, t in zip(report.records, truth)])),
                **upload_accuracy(report.records, report.device_answers, truth, gate))


def _truth(data: VQASet, sample_id: str) -> str:
    """The true answer of a stream sample (ids end in ``-q<question index>``)."""
    return data.answers[int(sample_id.rsplit("-q", 1)[1])]


def upload_accuracy(records, device_answers: list[str], truth: list[str], min_confidence: float) -> dict:
    """Teacher vs device MC accuracy on the uploads AKD trains on (after the teacher-confidence gate)."""
    kept = [i for i, r in enumerate(records) if r.confidence >= min_confidence]
    if not kept:
        return {"trained": 0, "upload_teacher_mc": None, "upload_device_mc": None}
    return {"trained": len(kept),
            "upload_teacher_mc": float(np.mean([records[i].pseudo_label == truth[i] for i in kept])),
            "upload_device_mc": float(np.mean([device_answers[i] == truth[i] for i in kept]))}

