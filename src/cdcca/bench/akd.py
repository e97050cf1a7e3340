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
