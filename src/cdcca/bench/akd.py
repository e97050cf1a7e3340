"""``cdcca bench akd``: the AKD ablations on the default continual shift stream.

Each variant runs the in-process round driver (:mod:`cdcca.bench.loop`) from the pretrained pair and
reports the device's final held-out MC accuracy averaged over the shifted domains, its source
(clean) accuracy, and the cloud's time split into teacher pass and student training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from cdcca.akd.config import LOSS_ABLATIONS
from cdcca.akd.distill import AKD
from cdcca.akd.source_set import load_source_set
from cdcca.bench.loop import Comparison, run_loop
from cdcca.config import RunConfig, apply, parse_sets
from cdcca.data.scenario import Scenario, scenario_chunks
from cdcca.data.stream import Domain, resolve_sequence
from cdcca.model.answer import answer_all, mc_predict
from cdcca.model.mllm import adapter_state, load_adapter_state
from cdcca.model.pair import load_pretrained, model_prompter
from cdcca.runtime.evaluate import test_tokens
from cdcca.trained_pair import active, run_stream
from cdcca.uplink import UTSConfig, build_uplink, decode_uplink, plan_uplink

# the paper's AKD alone: its label phase (3 epochs), no prefix distillation
LABELS_ONLY = {"akd.labels.epochs": 3, "akd.prefix.epochs": 0}
LOSS_TERMS = {name: {f"akd.labels.{k}": v for k, v in off.items()} for name, off in LOSS_ABLATIONS.items()}


@dataclass(frozen=True)
class Variant:
    """A bench row's way of running the loop: what it changes in the run config, and for comparison."""

    how: Comparison
    settings: dict = field(default_factory=dict)      # dotted keys of the run config


def variants() -> dict[str, Variant]:
    """name → how the variant runs.

    ``cdcca`` is the shipped pipeline end to end (UTS uplink, AKD with its defaults, DWC at its default
    budget). ``oracle`` adds the label phase on the uploads' true answers to the shipped AKD (dense
    downlink): what this data could deliver with perfect labels; ``oracle-labels-only`` is the same
    without prefix distillation. The ``loss:*``, ``pseudo-label``, ``no-gate``, ``soft-targets`` and
    ``akd-v1`` rows ablate the paper's label-phase AKD on its own (prefix distillation off), as
    ``labels-only`` does in full; ``prefix+labels`` runs both phases.
    """
    dense, oracle = Comparison("dense"), Comparison("dense", "oracle")
    no_gate = {"akd.labels.min_teacher_confidence": 0.0, "akd.labels.weighting": "none"}
    out: dict[str, Variant] = {
        "source-only": Variant(Comparison("none")),
        "cdcca": Variant(Comparison("dwc")),
        "cdcca-dense": Variant(dense),
        "oracle": Variant(oracle, {"akd.labels.epochs": 3}),
        "oracle-labels-only": Variant(oracle, LABELS_ONLY),
        "labels-only": Variant(dense, LABELS_ONLY),
        "prefix+labels": Variant(dense, {"akd.labels.epochs": 3}),
        "pseudo-label": Variant(dense, {**LOSS_TERMS["ce"], "akd.labels.weighting": "none", **LABELS_ONLY}),
        "no-gate": Variant(dense, {**no_gate, **LABELS_ONLY}),
        "no-source-replay": Variant(dense, {"akd.replay.source": 0.0, **LABELS_ONLY}),
        "soft-targets": Variant(dense, {"akd.labels.targets": "soft", **LABELS_ONLY}),
        "akd-v1": Variant(dense, {**no_gate, "akd.replay.source": 0.0, **LABELS_ONLY}),
    }
    for name, terms in LOSS_TERMS.items():
        out[f"loss:{name}"] = Variant(dense, {**terms, **LABELS_ONLY})
    for scorer in ("ood", "energy"):
        for keep in (0.25, 0.5, 0.75, 1.0):
            out[f"keep:{keep}:{scorer}"] = Variant(dense, {"uts.token_scorer": scorer, "uts.keep_ratio": keep})
    return out


@dataclass
class BenchModels:
    """What every bench cell starts from: the test data, the pretrained pair and a student copy."""

    data: object
    prompter: object                 # the device's (and AKD's student's) tokenizer
    device: object
    student: object
    teacher: object
    pretrained: dict
    teacher_prompter: object = None  # the cloud's own (another tokenizer in a cross-family pair)
    source: object = None
    torch_device: str = "cpu"        # where the teacher and AKD's student compute; the device model stays on the CPU

    @classmethod
    def load(cls, torch_device: str = "cpu") -> BenchModels:

        data = active().task.split("test")
        device = load_pretrained("device")
        teacher = load_pretrained("cloud").to(torch_device)
        return cls(data, model_prompter(device, active().answers), device, load_pretrained("device"), teacher,
                   adapter_state(device), model_prompter(teacher, active().answers), torch_device=torch_device)

    def source_set(self):
        """The labelled clean source set, loaded on first need."""
        if self.source is None:

            self.source = load_source_set(active().task.split("train"))
        return self.source

    def for_stream(self, stream: str):
        """(data, prompter) of a stream: the pair's test set, plus any JSONL file domains (their answers
        must be the pair's)."""

        data = run_stream(stream)
        return (self.data if data is active().task.split("test") else data), self.prompter

    def fresh_device(self):
        """The device model back at its pretrained adapters."""

        load_adapter_state(self.device, self.pretrained)
        return self.device


def loop_config(name: str, seed: int, base: RunConfig, sets: list[str] | None = None) -> tuple[RunConfig, Comparison]:
    """The run config and comparison of a variant: ``base``, the variant's own settings, ``--set`` on top, the seed
    (the stream's and the distiller's)."""
    table = variants()
    if name not in table:
        raise ValueError(f"unknown AKD bench variant {name!r}; choose from {', '.join(table)}")
    cfg = apply(apply(base, table[name].settings), parse_sets(sets or []))
    return apply(cfg, {"seed": seed, "akd.seed": seed}), table[name].how


def run_variant(models: BenchModels, name: str, seed: int, base: RunConfig, sets: list[str] | None = None,
                save_states: str | None = None) -> dict:
    """One bench row: a variant of the collaborative loop from the pretrained pair, on one seed."""
    import torch

    cfg, how = loop_config(name, seed, base, sets)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    data, prompter = models.for_stream(cfg.data.domains)
    akd = AKD(models.teacher, models.student, prompter, cfg.akd,
              source=models.source_set() if cfg.akd.needs_source else None, device=models.torch_device)
    res = run_loop(cfg, models.fresh_device(), akd, prompter, data, replace(how, save_states=save_states))
    return summarize(name, seed, res, time.perf_counter() - t0)


def run(names: list[str] | None = None, on_result=None, base: RunConfig | None = None, seeds: list[int] | None = None,
        sets: list[str] | None = None, save_states: str | None = None) -> list[dict]:
    """One row per (variant, seed): held-out MC over the shifted domains and clean, what was trained on, time."""
    unknown = set(names or []) - set(variants())
    if unknown:
        raise ValueError(f"unknown AKD bench variants {sorted(unknown)}; choose from {', '.join(variants())}")

    base = base or RunConfig()
    for name in names or list(variants()):
        cfg, _ = loop_config(name, 0, base, sets)      # a bad --set, domain or JSONL row fails before any model loads
        run_stream(cfg.data.domains)
    models = BenchModels.load(base.torch_device)
    results = []
    for seed in seeds or [0]:
        for name in names or list(variants()):
            results.append(run_variant(models, name, seed, base, sets, save_states))
            if on_result:
                on_result(results[-1])
    return results


def summarize(name: str, seed: int, res: dict, wall_s: float) -> dict:
    """A bench row from a loop result; upload accuracies are over the samples trained on (after gating)."""
    rounds = res["rounds"]
    teacher_s = sum(r.get("teacher_s", 0.0) for r in rounds)
    student_s = sum(r.get("student_s", 0.0) for r in rounds)
    uploads = sum(r["uploads"] for r in rounds)
    trained = sum(r.get("trained", 0) for r in rounds)

    def trained_mean(key: str):
        pairs = [(r[key], r["trained"]) for r in rounds if r.get(key) is not None]
        return float(sum(v * n for v, n in pairs) / sum(n for _, n in pairs)) if pairs else None

    return {"variant": name, "seed": seed, "adapted_mc": res["summary"]["adapted_mc"],
            **{k: res["summary"][k] for k in ("online_mc", "recovery", "revisit_first_round_mc", "after_shift")
               if k in res["summary"]},
            "source_mc": res["summary"]["source_mc"], "heldout": res["summary"]["heldout"],
            "uploads": uploads, "trained": trained,
            "upload_teacher_mc": trained_mean("upload_teacher_mc"), "upload_device_mc": trained_mean("upload_device_mc"),
            "bytes_up_per_round": res["summary"]["bytes_up_total"] / len(rounds),
            "bytes_down_per_round": res["summary"]["bytes_down_total"] / len(rounds),
            "teacher_s": round(teacher_s, 1), "student_s": round(student_s, 1),
            "samples_per_s": round(trained / (teacher_s + student_s), 2) if trained else None,
            "pseudo_label_acc": float(np.mean([r["pseudo_label_acc"] for r in rounds if "pseudo_label_acc" in r]))
            if uploads else None, "wall_s": round(wall_s, 1),
            "online_per_round": [r["online_mc"] for r in rounds], "domains": [r["domain"] for r in rounds],
            "correct_per_round": [r.get("correct") for r in rounds],
            "steps": [r.get("step", 0) for r in rounds], "visits": [r.get("visit", 0) for r in rounds],
            **{k: res["summary"][k] for k in ("adapted_da", "heldout_da", "source_da") if k in res["summary"]}}


TOKEN_VIEWS = {   # what the teacher sees of each uploaded sample
    "ood-most-0.5": dict(token_scorer="ood", direction="most", keep_ratio=0.5),
    "ood-least-0.5": dict(token_scorer="ood", direction="least", keep_ratio=0.5),
    "random-0.5": dict(token_scorer="random", keep_ratio=0.5),
    "all-tokens": dict(keep_ratio=1.0),
}


def teacher_study(domain: str = "pixelate:5", requests: int = 320, uploads: int = 128) -> list[dict]:
    """Teacher vs device MC accuracy on exactly the samples UTS uploads, per token view (no training).

    It answers: does the cloud know more than the device about the samples the device sends?
    """

    data = active().task.split("test")
    device, cloud = load_pretrained("device"), load_pretrained("cloud")
    prompter, cloud_prompter = model_prompter(device, active().answers), model_prompter(cloud, active().answers)
    dom = Domain.parse(domain)
    qids = scenario_chunks(data, [dom], Scenario("one-round", round_size=requests))[0].question_ids
    questions, gold = [data.questions[i] for i in qids], [data.answers[i] for i in qids]
    tokens = test_tokens(dom)[data.image_ids[qids]].float()
    answers = answer_all(device, prompter, tokens, questions)

    def teacher_acc(batch) -> float:
        picks = mc_predict(cloud, cloud_prompter, batch.tokens, batch.questions, batch.keep).argmax(-1)
        return float(np.mean([prompter.candidates[int(p)] == gold[int(i)] for p, i in zip(picks, batch.sample_ids)]))

    rows = []
    ids = [str(i) for i in range(len(qids))]
    for name, view in TOKEN_VIEWS.items():
        uts = UTSConfig(budget=uploads, **view)
        batch = decode_uplink(build_uplink(plan_uplink(tokens, questions, answers, ids, uts), uts,
                                           device_id="study", adapter_version="0"))
        rows.append({"view": name, "selection": "uncertain", "n": len(batch), "teacher_mc": teacher_acc(batch),
                     "device_mc": float(np.mean([answers[int(i)].mc == gold[int(i)] for i in batch.sample_ids]))})
    everything = UTSConfig(budget=len(qids), keep_ratio=1.0)
    batch = decode_uplink(build_uplink(plan_uplink(tokens, questions, answers, ids, everything), everything,
                                       device_id="study", adapter_version="0"))
    rows.append({"view": "all-tokens", "selection": "all requests", "n": len(batch), "teacher_mc": teacher_acc(batch),
                 "device_mc": float(np.mean([a.mc == g for a, g in zip(answers, gold)]))})
    return rows


def label_study(stream: str = "default", requests: int = 320, budgets: tuple[int, ...] = (128, 192, 320),
                gates: tuple[float, ...] = (0.0, 0.6, 0.8, 0.9),
                bands: tuple[float, ...] = (0.0, 0.2)) -> list[dict]:
    """How good the teacher's labels are on what AKD would train on: per domain, upload budget and
    teacher-confidence gate, the kept count and teacher vs device MC accuracy (no training).

    The uploads of a budget are the ``budget`` most uncertain requests (UTS default scorer, half the
    tokens); a gate keeps the uploads whose teacher confidence reaches it; a band > 0 first leaves
    that share of the most uncertain requests on the device (UTS ``skip_top``, CEMA's policy).
    """

    import torch

    data = active().task.split("test")
    device, cloud = load_pretrained("device"), load_pretrained("cloud")
    prompter, cloud_prompter = model_prompter(device, active().answers), model_prompter(cloud, active().answers)
    domains = resolve_sequence(stream)
    rows = []
    for chunk in scenario_chunks(data, domains, Scenario("one-round", round_size=requests)):
        qids = chunk.question_ids
        questions, gold = [data.questions[i] for i in qids], [data.answers[i] for i in qids]
        tokens = test_tokens(chunk.domain)[data.image_ids[qids]].float()
        answers = answer_all(device, prompter, tokens, questions)
        ids = [str(i) for i in range(len(qids))]
        for skip, budget in [(k, b) for k in bands for b in budgets if k == 0 or b < len(qids)]:
            uts = UTSConfig(budget=min(budget, len(qids)), skip_top=skip)
            batch = decode_uplink(build_uplink(plan_uplink(tokens, questions, answers, ids, uts), uts,
                                               device_id="study", adapter_version="0"))
            probs = torch.cat([mc_predict(cloud, cloud_prompter, batch.tokens[s:s + 64], batch.questions[s:s + 64],
                                          batch.keep[s:s + 64]) for s in range(0, len(batch), 64)])
            idx = [int(i) for i in batch.sample_ids]
            device_probs = torch.tensor([answers[i].mc_probs for i in idx])
            fused = probs * device_probs
            fused = fused / fused.sum(-1, keepdim=True)
            for label, p in (("teacher", probs), ("teacher×device", fused)):
                conf, pick = p.max(-1)
                for gate in gates:
                    kept = [j for j in range(len(idx)) if float(conf[j]) >= gate]
                    rows.append({"domain": str(chunk.domain), "budget": budget, "skip_top": skip, "labels": label,
                                 "gate": gate, "uploads": len(idx), "kept": len(kept),
                                 "teacher_mc": float(np.mean([prompter.candidates[int(pick[j])] == gold[idx[j]] for j in kept]))
                                 if kept else None,
                                 "device_mc": float(np.mean([answers[idx[j]].mc == gold[idx[j]] for j in kept])) if kept else None})
    return rows


def pool_label_study(rows: list[dict]) -> list[dict]:
    """The label study pooled over domains: per (budget, band, labels, gate), kept-weighted accuracies."""
    pooled: dict[tuple, dict] = {}
    for r in rows:
        key = (r["budget"], r["skip_top"], r["labels"], r["gate"])
        p = pooled.setdefault(key, {"budget": key[0], "skip_top": key[1], "labels": key[2], "gate": key[3],
                                    "uploads": 0, "kept": 0, "teacher_right": 0.0, "device_right": 0.0})
        p["uploads"] += r["uploads"]
        p["kept"] += r["kept"]
        if r["kept"]:
            p["teacher_right"] += r["teacher_mc"] * r["kept"]
            p["device_right"] += r["device_mc"] * r["kept"]
    out = []
    for p in pooled.values():
        n = p.pop("kept")
        t, d = p.pop("teacher_right"), p.pop("device_right")
        out.append({**p, "kept": n, "teacher_mc": t / n if n else None, "device_mc": d / n if n else None})
    return out
