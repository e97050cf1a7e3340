"""The benchmark driver: one device and the cloud over the continual shift stream, measured.

It runs exactly what ships — the device and cloud runtimes on scratch state dirs and the steps of
:mod:`cdcca.runtime.protocol` — and adds only measurement: held-out accuracy per domain after each round,
what the teacher and the device knew about the trained samples, timings. Three knobs exist for
comparison runs: ``downlink`` ("dwc" as shipped, "dense" full fp32 state, "none" = source-only),
``labels`` ("oracle": the uploads' true answers replace the teacher's) and ``save_states``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from cdcca.akd.distill import AKD, AKDConfig, with_true_labels
from cdcca.data.easyvqa import VQASet
from cdcca.data.scenario import STREAM_BUDGET, Scenario, recovery_curve, revisit_first_rounds, stream_spec
from cdcca.data.stream import Domain, heldout_questions, resolve_sequence
from cdcca.downlink import DWCConfig
from cdcca.model.mllm import MLLM, adapter_state
from cdcca.model.prompt import Prompter
from cdcca.runtime import protocol
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime
from cdcca.runtime.evaluate import accuracy, domain_tokens
from cdcca.uplink import UTSConfig


@dataclass
class LoopConfig:
    """One continual-adaptation run over a shift stream."""

    stream: str = field(default="default", metadata={"help": "the shift stream: built-in names, NAME:SEVERITY, .jsonl files"})
    scenario: str = field(default="persistent", metadata={"help": "how long each domain lasts: persistent | recurring | gradual | one-round"})
    rounds_per_domain: int | None = field(default=None, metadata={"help": "None: the scenario's default (persistent: 4)"})
    round_size: int | None = field(default=None, metadata={"help": "requests per round; None: the scenario's default (persistent: 80)"})
    visits: int = field(default=2, metadata={"help": "recurring: how many times the domains come back"})
    update_delay: int = field(default=0, metadata={"help": "rounds an update spends in transit (0: live from the next round)"})
    heldout_n: int = field(default=300, metadata={"help": "held-out questions per domain for per-round accuracy"})
    downlink: str = field(default="dense", metadata={"help": "'dense' (fp32 state) | 'dwc' (compressed update) | 'none' (source-only)"})
    labels: str = field(default="teacher", metadata={"help": "'teacher' (pseudo-labels) | 'oracle' (the true answers of the same uploads)"})
    uts: UTSConfig = field(default_factory=lambda: UTSConfig(selection="budget", budget=STREAM_BUDGET), metadata={"help": "the device's UTS: which requests and tokens it uploads per round"})
    akd: AKDConfig = field(default_factory=AKDConfig, metadata={"help": "the cloud's distillation into the device's adapters"})
    dwc: DWCConfig = field(default_factory=DWCConfig, metadata={"help": "the compressed downlink (downlink='dwc')"})
    eval_every_round: bool = field(default=True, metadata={"help": "held-out accuracy after every round (else after the last only)"})
    heldout_da: bool = field(default=False, metadata={"help": "also direct-answer accuracy (greedy generation) at held-out evaluations"})
    save_states: str | None = field(default=None, metadata={"help": "folder to save the device's adapter state after each round"})
    seed: int = field(default=0, metadata={"help": "which requests the stream draws, and training randomness"})

    def __post_init__(self):
        if self.downlink not in ("dense", "dwc", "none"):
            raise ValueError(f"LoopConfig.downlink must be dense, dwc or none; got {self.downlink!r}")
        if self.labels not in ("teacher", "oracle"):
            raise ValueError(f"LoopConfig.labels must be teacher or oracle; got {self.labels!r}")
        if not isinstance(self.update_delay, int) or self.update_delay < 0:
            raise ValueError(f"LoopConfig.update_delay must be a whole number of rounds ≥ 0; got {self.update_delay!r}")
        self.scenario_spec()                      # a bad scenario fails here, before any model loads

    def scenario_spec(self) -> Scenario:
        return Scenario(self.scenario, self.rounds_per_domain, self.round_size, self.visits)


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


def run_loop(cfg: LoopConfig, device: MLLM, akd: AKD, prompter: Prompter, data: VQASet,
             on_round=None, device_id: str = "device-0", workdir: str | Path | None = None) -> dict:
    """Run every round of ``cfg.stream`` through the runtimes and :mod:`cdcca.runtime.protocol`, as the
    demo and a deployment do, in a scratch state dir (``workdir``, default a temporary one);
    returns {"rounds": [...], "summary": {...}}."""
    if workdir is not None:
        return _run(cfg, device, akd, prompter, data, on_round, device_id, Path(workdir))
    with tempfile.TemporaryDirectory(prefix="cdcca-loop-") as tmp:
        return _run(cfg, device, akd, prompter, data, on_round, device_id, Path(tmp))


def _run(cfg: LoopConfig, device: MLLM, akd: AKD, prompter: Prompter, data: VQASet, on_round, device_id: str,
         root: Path) -> dict:
    domains = resolve_sequence(cfg.stream)
    scenario = cfg.scenario_spec()
    stream = stream_spec(cfg.stream, scenario, cfg.seed)
    dev = DeviceRuntime.create(root / "device", device_id, uts=cfg.uts, stream=stream, model=device)
    cloud = CloudRuntime(root / "cloud", akd, adapter_state(device), cfg.dwc,
                         downlink="dense" if cfg.downlink == "dense" else "dwc")
    cloud.teacher_answers = True         # the rows report how often the teacher was right on the uploads
    if cfg.labels == "oracle":
        cloud.label_override = lambda records: with_true_labels(records, [_truth(data, r.sample_id) for r in records],
                                                                prompter.candidates)
    slots = scenario.schedule(domains)
    link = protocol.DelayedLink(cfg.update_delay)
    rounds = []
    t_start = time.perf_counter()
    try:
        for rnd, slot in enumerate(slots):
            row = _round(cfg, dev, cloud, data, rnd, link)
            row.update(visit=slot.visit, step=slot.step)
            if cfg.save_states:
                Path(cfg.save_states).mkdir(parents=True, exist_ok=True)
                save_file(dev.store.current()[1], str(Path(cfg.save_states) / f"round{rnd}.safetensors"))
            if cfg.eval_every_round or rnd == len(slots) - 1:
                measure_heldout(row, dev.model, prompter, data, scenario.domains(domains), cfg.heldout_n, cfg.heldout_da)
            rounds.append(row)
            if on_round:
                on_round(row)
    finally:
        dev.close()
        cloud.close()
    return {"rounds": rounds, "summary": loop_summary(rounds, cfg, time.perf_counter() - t_start)}


def online_summary(rounds: list[dict]) -> dict:
    """What users got: online MC over the shifted rounds, the recovery curve, and (recurring) the
    first round of every later visit."""
    shifted = [r["online_mc"] for r in rounds if r["domain"] != "clean" and r.get("online_mc") is not None]
    out = {"online_mc": float(np.mean(shifted)) if shifted else None, "recovery": recovery_curve(rounds)}
    revisit = revisit_first_rounds(rounds)
    if revisit is not None:
        out["revisit_first_round_mc"] = revisit
    return out


def loop_summary(rounds: list[dict], cfg: LoopConfig, wall_s: float) -> dict:
    """The run's summary from its rounds: online accuracy, the last round's held-out scores, the bytes moved."""
    last = rounds[-1]
    summary = {**online_summary(rounds), "adapted_mc": last["heldout_mc"], "source_mc": last["source_mc"],
               "heldout": last["heldout"], "bytes_up_total": sum(r["bytes_up"] for r in rounds),
               "bytes_down_total": sum(r["bytes_down"] for r in rounds),
               "wall_s": round(wall_s, 1), "config": jsonable(asdict(cfg))}
    if "heldout_da" in last:
        summary.update(heldout_da=last["heldout_da"],
                       adapted_da=float(np.mean(list(last["heldout_da"].values()))) if last["heldout_da"] else None,
                       source_da=last["source_da"])
    return summary


def _round(cfg: LoopConfig, dev: DeviceRuntime, cloud: CloudRuntime, data: VQASet, rnd: int,
           link: protocol.DelayedLink) -> dict:
    """One round of the protocol (or only serving, for source-only) and what it moved and trained.
    The update the cloud sends travels over ``link``: applied after this round, or ``link.delay`` rounds later."""
    t0 = time.perf_counter()
    before = dev.status()
    served = dev.serve_round(rnd)            # the simulated traffic fills the outbox; the round moves it
    uploads = 0
    if cfg.downlink != "none":
        _, down, _ = protocol.run_round(dev, cloud, rnd, link=link)
        uploads = len(down.acked)
    after = dev.status()
    row = {"round": rnd, "device": dev.device_id, "domain": served["domain"], "online_mc": served["online_mc"],
           "uploads": uploads, "bytes_up": after["bytes_up"] - before["bytes_up"],
           "bytes_down": after["bytes_down"] - before["bytes_down"], "version": after["version"]}
    report = cloud.last_round if uploads else None
    if report is not None:
        truth = [_truth(data, sid) for sid in report.sample_ids]
        akd_cfg = cloud.akd.cfg
        # the teacher-confidence gate applies to the label phase only: the oracle and prefix
        # distillation (which uses no answer) train on every upload
        gate = akd_cfg.min_teacher_confidence if cfg.labels != "oracle" and akd_cfg.epochs > 0 else 0.0
        st = report.stats
        row.update(teacher_s=round(report.teacher_s, 2), student_s=round(st.student_s, 2),
                   samples_per_s=round(st.samples_per_s, 2), losses=st.losses, replayed=st.replayed,
                   pseudo_label_acc=float(np.mean([r.pseudo_label == t for r, t in zip(report.records, truth)])),
                   **upload_accuracy(report.records, report.device_answers, truth, gate))
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


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


def jsonable(obj):
    """Tuples as lists, recursively: what a config looks like once written as JSON."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
