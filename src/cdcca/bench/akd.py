"""``cdcca bench akd``: the AKD ablations on the default continual shift stream.

Each variant runs the in-process round driver (:mod:`cdcca.loop`) from the pretrained pair and
reports the device's final held-out MC accuracy averaged over the shifted domains, its source
(clean) accuracy, and the cloud's time split into teacher pass and student training.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from cdcca.distill import AKDConfig
from cdcca.loop import LoopConfig, run_loop
from cdcca.uplink import UTSConfig

BENCH_LOOP = dict(per_domain=320, heldout_n=200, eval_every_round=False)
UTS_DEFAULT = UTSConfig(selection="budget", budget=128)


def variants() -> dict[str, dict]:
    """name → LoopConfig overrides. Loss ablations at the default UTS; keep ratios with ood / energy."""
    out: dict[str, dict] = {"source-only": dict(downlink="none")}
    for name in ("ce", "ce+mse", "ce+mse+wave", "full"):
        out[f"loss:{name}"] = dict(akd=AKDConfig.ablation(name))
    for scorer in ("ood", "energy"):
        for keep in (0.25, 0.5, 0.75, 1.0):
            out[f"keep:{keep}:{scorer}"] = dict(uts=replace(UTS_DEFAULT, token_scorer=scorer, keep_ratio=keep))
    return out


def run(names: list[str] | None = None, on_result=None, base: dict | None = None) -> list[dict]:
    from cdcca.assets import load_tokenizer
    from cdcca.data.easyvqa import load_split
    from cdcca.distill import AKD
    from cdcca.model.mllm import adapter_state, load_adapter_state
    from cdcca.model.pair import load_pretrained
    from cdcca.model.prompt import Prompter

    table = variants()
    unknown = set(names or []) - set(table)
    if unknown:
        raise ValueError(f"unknown AKD bench variants {sorted(unknown)}; choose from {', '.join(table)}")
    data = load_split("test")
    prompter = Prompter(load_tokenizer(), data.candidates)
    device, student, teacher = load_pretrained("device"), load_pretrained("device"), load_pretrained("cloud")
    pretrained = adapter_state(device)
    results = []
    for name in names or list(table):
        load_adapter_state(device, pretrained)
        cfg = LoopConfig(**{**BENCH_LOOP, "uts": UTS_DEFAULT, **(base or {}), **table[name]})
        t0 = time.perf_counter()
        res = run_loop(cfg, device, AKD(teacher, student, prompter, cfg.akd), prompter, data)
        rounds = res["rounds"]
        teacher_s = sum(r.get("teacher_s", 0.0) for r in rounds)
        student_s = sum(r.get("student_s", 0.0) for r in rounds)
        uploads = sum(r["uploads"] for r in rounds)
        row = {"variant": name, "adapted_mc": res["summary"]["adapted_mc"], "source_mc": res["summary"]["source_mc"],
               "heldout": res["summary"]["heldout"], "uploads": uploads,
               "bytes_up_per_sample": (res["summary"]["bytes_up_total"] / uploads) if uploads else 0,
               "teacher_s": round(teacher_s, 1), "student_s": round(student_s, 1),
               "samples_per_s": round(uploads / (teacher_s + student_s), 2) if uploads else None,
               "pseudo_label_acc": float(np.mean([r["pseudo_label_acc"] for r in rounds if "pseudo_label_acc" in r]))
               if uploads else None, "wall_s": round(time.perf_counter() - t0, 1)}
        results.append(row)
        if on_result:
            on_result(row)
    return results


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
    from cdcca.assets import load_tokenizer
    from cdcca.data.easyvqa import load_split
    from cdcca.data.stream import Domain, build_stream
    from cdcca.evaluate import test_tokens
    from cdcca.model.answer import answer_batch, mc_predict
    from cdcca.model.pair import load_pretrained
    from cdcca.model.prompt import Prompter
    from cdcca.uplink import build_uplink, decode_uplink, plan_uplink

    data = load_split("test")
    prompter = Prompter(load_tokenizer(), data.candidates)
    device, cloud = load_pretrained("device"), load_pretrained("cloud")
    dom = Domain.parse(domain)
    qids = build_stream(data, [dom], requests, 1, 0)[0].question_ids
    questions, gold = [data.questions[i] for i in qids], [data.answers[i] for i in qids]
    tokens = test_tokens(dom)[data.image_ids[qids]].float()
    answers = []
    for s in range(0, len(qids), 64):
        answers += answer_batch(device, prompter, tokens[s:s + 64], questions[s:s + 64])

    def teacher_acc(batch) -> float:
        picks = mc_predict(cloud, prompter, batch.tokens, batch.questions, batch.keep).argmax(-1)
        return float(np.mean([prompter.candidates[int(p)] == gold[int(i)] for p, i in zip(picks, batch.sample_ids)]))

    rows = []
    ids = [str(i) for i in range(len(qids))]
    for name, view in TOKEN_VIEWS.items():
        uts = replace(UTS_DEFAULT, budget=uploads, **view)
        batch = decode_uplink(build_uplink(plan_uplink(tokens, questions, answers, ids, uts), uts,
                                           device_id="study", adapter_version="0"))
        rows.append({"view": name, "selection": "uncertain", "n": len(batch), "teacher_mc": teacher_acc(batch),
                     "device_mc": float(np.mean([answers[int(i)].mc == gold[int(i)] for i in batch.sample_ids]))})
    everything = replace(UTS_DEFAULT, budget=len(qids), keep_ratio=1.0)
    batch = decode_uplink(build_uplink(plan_uplink(tokens, questions, answers, ids, everything), everything,
                                       device_id="study", adapter_version="0"))
    rows.append({"view": "all-tokens", "selection": "all requests", "n": len(batch), "teacher_mc": teacher_acc(batch),
                 "device_mc": float(np.mean([a.mc == g for a, g in zip(answers, gold)]))})
    return rows
