"""The main job: the whole continual loop on the real pretrained pair, with a live display and a report.

setup (fleet of device runtimes + cloud runtime) → source-only baseline → rounds → report.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cdcca.akd.distill import AKD
from cdcca.akd.source_set import load_source_set
from cdcca.assets import cache_dir
from cdcca.atomic import write_json
from cdcca.bench.loop import Comparison, heldout_mc, run_loop
from cdcca.bench.report import write_report
from cdcca.config import RunConfig, flatten, to_toml
from cdcca.data.scenario import Slot, after_shift, recovery_curve, revisit_first_rounds
from cdcca.data.stream import Domain, resolve_sequence
from cdcca.fleet.local import LocalFleet, domains_of, schedule
from cdcca.fleet.traffic import SimulatedTraffic
from cdcca.model.answer import mc_predict
from cdcca.model.pair import load_pretrained, pretrain_record, role_prompter
from cdcca.trained_pair import active, run_stream


def _heldout_evaluator(role: str = "device"):
    """A function (model, domains, n) → held-out MC per domain on the stream's data (the pair's test images
    and any JSONL files among the domains), over the pair's answers, in ``role``'s own tokenizer."""

    prompter = role_prompter(role, active().answers)

    def evaluate(model, domains, n):
        return heldout_mc(model, prompter, run_stream(domains), domains, n)

    return evaluate


def _cached_reference(role: str, what: str, domains: list[Domain], compute: Callable[[], dict]) -> dict:
    """A reference measurement of a never-updated model, cached by its weights' hash and ``what`` (the
    settings it depends on): it cannot change between runs. Your own files may, so they are measured every time."""
    import hashlib
    import json

    if any(d.path for d in domains):
        return compute()
    sha = pretrain_record(role).get("sha256", "unknown")[:16]
    path = cache_dir() / "reference" / f"{role}-{sha}-{hashlib.sha256(what.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_json(path, result)
    return result


def _teacher_reference(domains: list[Domain], n: int) -> dict[str, float]:
    """The cloud teacher's own held-out MC per domain."""

    return _cached_reference("cloud", f"teacher {[str(d) for d in domains]} n={n}", domains,
                             lambda: _heldout_evaluator("cloud")(load_pretrained("cloud"), domains, n))


def _oracle_reference(cfg: RunConfig) -> dict[str, float]:
    """Held-out MC after the same stream trained on the true labels of the same uploads (dense updates):
    what any teacher could pass on with this data. Cached by the weights' hashes and the settings."""
    import hashlib
    import json

    loop = replace(cfg, eval=replace(cfg.eval, curve_n=0))       # the last round's held-out accuracy only
    files = [hashlib.sha256(Path(d.path).read_bytes()).hexdigest() for d in resolve_sequence(cfg.data.domains) if d.path]
    key = json.dumps([pretrain_record("cloud").get("sha256"), pretrain_record("device").get("sha256"),
                      flatten(loop), "oracle", files], sort_keys=True)
    path = cache_dir() / "reference" / f"oracle-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    data = run_stream(cfg.data.domains)
    prompter = role_prompter("device", active().answers)
    device, student, teacher = load_pretrained("device"), load_pretrained("device"), load_pretrained("cloud")
    source = load_source_set(active().task.split("train")) if cfg.akd.needs_source else None
    res = run_loop(loop, device, AKD(teacher, student, prompter, cfg.akd, source=source, device=cfg.torch_device),
                   prompter, data, Comparison(downlink="dense", labels="oracle"))
    acc = {**res["summary"]["heldout"], "clean": res["summary"]["source_mc"],
           "online": [r["online_mc"] for r in res["rounds"]]}
    write_json(path, acc)
    return acc


def _source_only_online(cfg: RunConfig, device) -> list[list[bool]]:
    """Per round, whether the never-updated device answers each request the first device serves right, in
    the order served (run before any update, so the device still holds its pretrained adapters)."""

    prompter = device._prompter()
    out = []
    traffic = SimulatedTraffic.of(device)
    for rnd in range(len(schedule(cfg))):
        tokens, questions, gold, _, _ = traffic.chunk(rnd)
        right: list[bool] = []
        for s in range(0, len(questions), 64):
            probs = mc_predict(device.model, prompter, tokens[s:s + 64], questions[s:s + 64])
            right += [prompter.candidates[int(p)] == g for p, g in zip(probs.argmax(-1), gold[s:s + 64])]
        out.append(right)
    return out


def settings_of(cfg: RunConfig, preset: str) -> dict:
    """The knobs a reader needs to judge the run, in words and rounded numbers."""
    a, u, w, ev = cfg.akd, cfg.uts, cfg.dwc, cfg.eval
    return {
        "preset": preset, "stream": cfg.data.domains, "devices": cfg.fleet.devices,
        "fleet group": "all devices share one student" if cfg.fleet.group else "one student per device",
        "scenario": _scenario_in_words(cfg), "update delay (rounds)": cfg.stream.update_delay,
        "held-out questions per domain": ev.heldout_n if ev.curve_n in (0, ev.heldout_n)
        else f"{ev.heldout_n} after the last round ({ev.curve_n} for the curves of earlier rounds)",
        "uplink (UTS)": f"{u.selection} {u.budget if u.selection == 'budget' else u.threshold} most uncertain"
                        f"{' per device' if cfg.fleet.devices > 1 else ''} by "
                        f"{u.sample_scorer}; {u.keep_ratio:.0%} of tokens by {u.token_scorer}, {u.token_dtype}",
        "distillation (AKD)": _akd_in_words(a),
        "downlink (DWC)": f"{w.quantizer}, budget {w.budget_bytes / 1024 if w.budget_bytes else 0:.0f} KiB, "
                          f"error feedback {'on' if w.error_feedback else 'off'}",
        "seed": cfg.seed,
    }


def _scenario_in_words(cfg: RunConfig) -> str:
    sc = cfg.scenario
    visits = f", {sc.visits} visits" if sc.name == "recurring" else ""
    return f"{sc.name}: {sc.per_domain} rounds per domain{visits}, {sc.size} requests per round per device"


def _akd_in_words(a) -> str:
    parts = []
    pre, lab = a.prefix, a.labels
    if pre.epochs:
        parts.append(f"prefix distillation of the bridge ({a.params.prefix_params}): {pre.epochs} epochs, lr {pre.lr:g}, "
                     f"every upload, anchored on clean source images {a.replay.source:g}:1")
    if lab.epochs:
        parts.append(f"label phase: {lab.epochs} epochs, lr {lab.lr:g}, teacher-confidence gate {lab.min_teacher_confidence:g}, "
                     f"weighting {lab.weighting}, targets {lab.targets}, trains {a.params.train}")
    return "; ".join(parts) + f"; replay {a.replay.per_round:g}:1"


def domain_label(domain: str) -> str:
    """A domain as a table shows it: a JSONL file by its stem, a built-in domain as written."""
    return Path(domain).stem if domain.endswith(".jsonl") else domain


def _table(rows: list[dict], title: str) -> Table:
    """The live per-round table, 80 columns wide: online MC next to the never-updated device's on the same
    requests (src-only), held-out MC when the stream leaves a domain, clean MC, KiB up and down, and the
    round's seconds (with several devices their names instead: a round's seconds are the fleet's)."""
    many = len({r["device"] for r in rows}) > 1
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for c in ("rnd", *(["dev"] if many else []), "domain", "online", "src-only", "heldout", "clean", "KiB up", "KiB dn",
              *([] if many else ["s"])):
        t.add_column(c, justify="left" if c == "domain" else "right", no_wrap=True)

    def num(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in rows:
        t.add_row(str(r["round"]), *([r["device"]] if many else []), domain_label(r["domain"]), num(r["online_mc"]),
                  num(r.get("source_only_online_mc")), num(r.get("heldout_mc")), num(r.get("source_mc")),
                  f"{r['bytes_up'] / 1024:.0f}", f"{r['bytes_down'] / 1024:.0f}", *([] if many else [f"{r['wall_s']:.0f}"]))
    return t


def _references(cfg: RunConfig, fleet: LocalFleet, domains: list[Domain],
                console: Console) -> tuple[Callable[[Any], dict], dict[str, dict]]:
    """The per-round evaluator and what the summary compares with: the never-updated device (held-out
    per domain and online) and the cloud teacher. Tiny models have neither: no held-out evaluation."""
    if cfg.model.tiny:
        return (lambda dev, rnd: {"heldout_mc": None, "source_mc": None}), {"source_only": {}, "online": {}, "teacher": {}}
    clean = Domain("clean", 0)
    heldout = _heldout_evaluator()
    console.print("source-only baseline: held-out and online accuracy of the pretrained device (cached per weights) …")
    first, slots, n_last = fleet.devices[0], schedule(cfg), cfg.eval.heldout_n
    base = _cached_reference("device", f"held-out {[str(d) for d in domains]} n={n_last}", domains,
                             lambda: heldout(first.model, domains + [clean], n_last))
    online_base = _cached_reference("device", f"online per request {sorted(first.config['stream'].items())} rounds={len(slots)}",
                                    domains, lambda: {"rounds": _source_only_online(cfg, first)})["rounds"]
    console.print("cloud teacher: its own held-out accuracy (cached per weights) …")
    teacher = _teacher_reference(domains + [clean], n_last)
    warn_weak_teacher(teacher, base, domains, console)
    last = len(slots) - 1

    def evaluate(dev, rnd: int):
        # held-out evaluation on the first device only, when the stream leaves a domain (and at the end)
        if dev is not fleet.devices[0]:
            return {"heldout_mc": None, "source_mc": None}
        reference = {"source_only_online_mc": float(np.mean(online_base[rnd])) if online_base[rnd] else float("nan")}
        n = n_last if rnd == last else cfg.eval.curve_n if leaves_domain(slots, rnd) else 0
        if n == 0:                        # no curve point this round (or none asked for)
            return {**reference, "heldout_mc": None, "source_mc": None}
        acc = heldout(dev.model, domains + [clean], n)
        return {**reference, "heldout": {str(d): acc[str(d)] for d in domains},
                "heldout_mc": float(np.mean([acc[str(d)] for d in domains])), "source_mc": acc["clean"]}

    return evaluate, {"source_only": base, "online": online_base, "teacher": teacher}


def warn_weak_teacher(teacher: dict, device: dict, domains: list[Domain], console: Console) -> None:
    """Say so when the cloud teacher is no better than the device where the stream goes: every update
    would then pull the device towards a weaker model (a cloud trained too briefly, or on other shifts)."""
    lead = float(np.mean([teacher[str(d)] - device[str(d)] for d in domains]))
    if lead <= 0:
        console.print(f"[yellow]warning: the cloud teacher is {-100 * lead:.1f} points behind the device on held-out "
                      "questions of the stream's domains: updates will follow a weaker model; train the cloud "
                      "further (docs/MODELS.md)[/yellow]")


def leaves_domain(slots: list[Slot], rnd: int) -> bool:
    """Whether round ``rnd`` is the last of its domain's visit (the stream shifts after it)."""
    return rnd == len(slots) - 1 or slots[rnd + 1].step == 0


def _run_rounds(fleet: LocalFleet, evaluate: Callable[[Any], dict], console: Console) -> list[dict]:
    """Every round on every device, with a live table of the rows so far."""
    rows: list[dict] = []
    with Live(_table(rows, "cdcca demo"), console=console, refresh_per_second=2) as live:
        for rnd in range(len(fleet.slots)):
            rows += fleet.run_round(rnd, evaluate)
            live.update(_table(rows, f"cdcca demo — round {rnd + 1}/{len(fleet.slots)}"))
    return rows


def _summary(cfg: RunConfig, preset: str, domains: list[Domain], rows: list[dict], refs: dict[str, dict],
             oracle_acc: dict[str, float], t0: float) -> dict:
    """The run in a few numbers: adapted vs source-only held-out MC, the teacher and oracle references, traffic."""
    n_rounds, tiny = len(schedule(cfg)), cfg.model.tiny
    last = [r for r in rows if r["round"] == n_rounds - 1 and r.get("heldout_mc") is not None]
    base, teacher = refs["source_only"], refs["teacher"]
    return {
        **online_figures(rows, refs["online"]),
        "source_only_mc": float("nan") if tiny else float(np.mean([base[str(d)] for d in domains])),
        "adapted_mc": float(np.mean([r["heldout_mc"] for r in last])) if last else float("nan"),
        "source_mc_before": None if tiny else base["clean"],
        "source_mc_after": last[0]["source_mc"] if last else None,
        "source_only": base,
        "adapted": {**last[0]["heldout"], "clean": last[0]["source_mc"]} if last else {},
        "teacher": teacher,
        "teacher_mc": None if tiny else float(np.mean([teacher[str(d)] for d in domains])),
        "oracle": oracle_acc,
        "oracle_mc": float(np.mean([oracle_acc[str(d)] for d in domains])) if oracle_acc else None,
        "bytes_up_total": sum(r["bytes_up"] for r in rows), "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "uploads_total": sum(r["uploads"] for r in rows), "devices": cfg.fleet.devices, "rounds": n_rounds,
        "cloud_s_total": round(sum(r["cloud_s"] for r in rows), 1), "group": cfg.fleet.group,
        "stream": cfg.data.domains, "domains": [str(d) for d in domains], "preset": preset, "settings": settings_of(cfg, preset),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def online_figures(rows: list[dict], source_only_online: list[list[bool]]) -> dict:
    """What users got, next to what the never-updated device answered to the same requests (per round, each
    request right or not): online MC over the shifted rounds, per domain, the recovery curve, the first
    20 / 40 / 80 requests after each shift and the requests until half the gain (``after_shift``) and (when
    domains come back) the first round of a revisit. The first device's rows are compared (the reference
    answered its requests); each of its rows gains ``source_only_online_mc`` and ``source_only_correct``."""
    if not rows or not source_only_online:
        return {}
    first = sorted((r for r in rows if r["device"] == rows[0]["device"]), key=lambda r: r["round"])
    for r in first:
        r["source_only_correct"] = list(source_only_online[r["round"]])
        r["source_only_online_mc"] = float(np.mean(r["source_only_correct"])) if r["source_only_correct"] else float("nan")
    shifted = [r for r in first if r["domain"] != "clean"]
    out = {"online_mc": float(np.mean([r["online_mc"] for r in shifted])),
           "source_only_online_mc": float(np.mean([r["source_only_online_mc"] for r in shifted])),
           "recovery": recovery_curve(first), "source_only_recovery": recovery_curve(first, "source_only_online_mc"),
           "after_shift": after_shift(first, reference="source_only_correct"),
           "source_only_after_shift": after_shift(first, "source_only_correct"),
           "online_by_domain": {d: {"online_mc": float(np.mean([r["online_mc"] for r in shifted if r["domain"] == d])),
                                    "source_only_online_mc": float(np.mean([r["source_only_online_mc"] for r in shifted
                                                                            if r["domain"] == d]))}
                                for d in dict.fromkeys(r["domain"] for r in shifted)}}
    revisit = revisit_first_rounds(first)
    if revisit is not None:
        out["revisit_first_round_mc"] = revisit
        out["source_only_revisit_first_round_mc"] = revisit_first_rounds(first, "source_only_online_mc")
    return out


def run_demo(cfg: RunConfig, out: Path, preset: str = "quick", console: Console | None = None,
             oracle: bool = False) -> dict:
    """Run ``cfg`` (named ``preset`` in the report) from the pretrained pair; write metrics, plots, the
    report and the run's ``config.toml`` to ``out``."""
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg, f"cdcca demo --config {out / 'config.toml'}   (the settings of a run of {preset})"))
    import torch

    torch.manual_seed(cfg.seed)                  # dropout in the student's bridge: same seed, same run
    for sub in ("cloud", "devices"):            # a demo always starts from the pretrained pair
        shutil.rmtree(out / sub, ignore_errors=True)
    t0 = time.perf_counter()
    laps = {}
    fleet = LocalFleet.setup(cfg, out)
    domains = domains_of(cfg)
    laps["setup_s"] = time.perf_counter() - t0
    evaluate, refs = _references(cfg, fleet, domains, console)
    laps["references_s"] = time.perf_counter() - t0 - sum(laps.values())
    rows = _run_rounds(fleet, evaluate, console)
    fleet.close()
    laps["rounds_s"] = time.perf_counter() - t0 - sum(laps.values())
    oracle_acc = {}
    if oracle and not cfg.model.tiny:
        console.print("oracle: the same stream trained on the true labels of the same uploads (cached per settings) …")
        oracle_acc = _oracle_reference(cfg)
    laps["oracle_s"] = time.perf_counter() - t0 - sum(laps.values())
    metrics = {"rounds": rows, "summary": _summary(cfg, preset, domains, rows, refs, oracle_acc, t0)}
    metrics["summary"]["timing"] = _timing(rows, laps)
    write_report(out, metrics)
    return metrics


def _timing(rows: list[dict], laps: dict[str, float]) -> dict[str, float]:
    """Where the demo's time went: setup, references, the rounds split into the cloud's AKD → DWC,
    the devices' serving and packets, and the per-round held-out evaluation; then the oracle."""
    by_round = {r["round"]: r["wall_s"] for r in rows}
    cloud = sum(r["cloud_s"] for r in rows)
    evaluation = sum(r.get("eval_s", 0.0) for r in rows)
    out = {**laps, "cloud_s": cloud, "devices_s": sum(by_round.values()) - cloud, "heldout_eval_s": evaluation}
    return {k: round(v, 1) for k, v in out.items()}
