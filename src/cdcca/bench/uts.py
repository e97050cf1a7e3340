"""``cdcca bench uts``: what UTS uploads on the default shift stream, what it costs, and how well it picks.

On the default stream (``resolve_sequence("default")``, stream questions from ``scenario_chunks``, one round per domain) the
device answers every request; then

* ``auroc``: for every sample scorer, the AUROC of its uncertainty for predicting the device's wrong
  multiple-choice answers (1.0 = every wrong answer is more uncertain than every right one), the
  opt-in two-view ``view_consistency`` scorer included;
* ``bytes_per_uploaded_sample``: per token scorer × keep ratio, uplink bytes per uploaded sample, and
  ``uploaded_mc_accuracy``: MC accuracy of the fidelity model (the cloud when its weights exist, else the
  device) on the uploaded samples from the decoded packet — how much the kept tokens still carry;
* ``bytes_per_upload`` (default code) next to ``png_64_bytes``, ``jpeg_64_bytes``, ``png_224_bytes``,
  ``jpeg_224_bytes`` (the uploaded frames as PNG / JPEG q90 at 64 px and the encoder's 224 px); ``codes``:
  per token code, bytes per upload and the fidelity model's MC accuracy on its decoded uploads;
* ``ratio_full_tokens`` / ``ratio_png`` / ``ratio_jpeg224``: default uplink bytes per request against every
  request's full fp32 tokens, its 64×64 PNG, or a 224×224 JPEG (q=90) of the same (shifted) image;
* ``timing``: UTS work per request (sample and token scoring, selection, coding, packing) as a fraction of
  the device's own answer time, medians over repeats at one batch size. ``overhead`` is the worst case —
  every request uploaded — for the default token scorer; ``overhead_at_upload_rate`` scales it by the upload rate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdcca.data.corruptions import corrupt
from cdcca.data.scenario import Scenario, scenario_chunks
from cdcca.data.stream import resolve_sequence
from cdcca.metrics import auroc
from cdcca.model.answer import answer_batch, mc_predict
from cdcca.model.pair import load_pretrained, model_prompter, weights_file
from cdcca.model.prompt import normalize_answer
from cdcca.runtime.evaluate import test_tokens
from cdcca.trained_pair import active
from cdcca.uplink import (
    SAMPLE_SCORERS,
    TOKEN_SCORER_NAMES,
    UTSConfig,
    build_uplink,
    decode_uplink,
    default_token_stats,
    frame_bytes,
    plan_uplink,
    sample_uncertainty,
    view_uncertainty,
)

KEEP_RATIOS = (0.25, 0.5, 0.75, 1.0)
CODES = ("full-int8", "pca64-int8", "pca128-int8", "pca128-int4", "pca128-ec", "pca256-ec")
_FRAMES = {"png_64": ("PNG", 64), "jpeg_64": ("JPEG", 64), "png_224": ("PNG", 224), "jpeg_224": ("JPEG", 224)}


jpeg224_bytes = partial(frame_bytes, fmt="JPEG", size=224)


def _source_png_sizes(n_images: int) -> list[int]:
    """Bytes of easy-VQA's own test PNG files (clean, 64×64)."""
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()        # a dict: image id → path
    return [Path(paths[i]).stat().st_size for i in range(n_images)]


def _auroc_ci(scores, labels, n_boot: int = 200, seed: int = 0) -> list[float]:
    """Bootstrap 95 % interval of the AUROC (resampling requests)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    vals = [auroc(s[i], y[i]) for i in (rng.integers(0, len(s), len(s)) for _ in range(n_boot))]
    vals = [v for v in vals if not np.isnan(v)]
    return [round(float(np.quantile(vals, 0.025)), 4), round(float(np.quantile(vals, 0.975)), 4)] if vals else [None, None]


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _answer_all(model, prompter, tokens, questions, batch_size):

    out = []
    for s in range(0, len(questions), batch_size):
        out += answer_batch(model, prompter, tokens[s:s + batch_size], questions[s:s + batch_size])
    return out


def _mc_accuracy(model, prompter, batch, gold: list[str], batch_size: int = 64) -> float:

    right = 0
    for s in range(0, len(gold), batch_size):
        probs = mc_predict(model, prompter, batch.tokens[s:s + batch_size], batch.questions[s:s + batch_size],
                           keep=batch.keep[s:s + batch_size])
        right += sum(prompter.candidates[int(i)] == g for i, g in zip(probs.argmax(-1), gold[s:s + batch_size]))
    return right / max(1, len(gold))

def _flat(rounds: list[dict], key: str) -> list:
    """One per-request field of every round, in stream order."""
    return [x for r in rounds for x in r[key]]


def _best(aurocs: dict[str, float], names) -> str:
    """The scorer of ``names`` with the highest AUROC (NaN counts as lowest)."""
    return max(names, key=lambda k: -1 if np.isnan(aurocs[k]) else aurocs[k])


@dataclass
class _Bench:
    """What every measured part shares: the real pretrained pair and data, unless a test passes its own."""

    model: Any
    which: str
    data: Any
    prompter: Any
    fidelity_model: Any
    fid_name: str
    tokens_for: Callable[[Any], torch.Tensor]
    stats: Any


def _load(model, prompter, fidelity_model, tokens_for, stats, fidelity: bool, torch_device: str = "cpu") -> _Bench:
    """Fill in the defaults: the pretrained device, the cloud as fidelity model when its weights exist,
    the packaged token statistics, cached test features; the cloud on ``torch_device``, the device on the CPU."""

    which = "given"
    if model is None:
        model, which = load_pretrained("device"), "pretrained device"
    data = active().task.split("test")
    prompter = prompter or model_prompter(model, active().answers)
    fid_name = "device"
    if fidelity and fidelity_model is None:
        if which == "pretrained device" and weights_file("cloud").is_file():
            fidelity_model, fid_name = load_pretrained("cloud").to(torch_device), "pretrained cloud"
        else:
            fidelity_model = model
    elif fidelity_model is not None:
        fid_name = "given"
    if stats is None and model.bridge.cfg.token_dim == 1280:
        stats = default_token_stats()
    return _Bench(model, which, data, prompter, fidelity_model, fid_name, tokens_for or test_tokens, stats)


def _answer_round(bench: _Bench, chunk, cfg: UTSConfig, file_sizes: list[int]) -> dict:
    """The device answers one round; keep what the later parts measure (tokens, answers, view scores, image bytes)."""

    data = bench.data
    feats = bench.tokens_for(chunk.domain)
    imgs_all = corrupt(data.images, chunk.domain.corruption, chunk.domain.severity, 0)
    qids = chunk.question_ids
    img_ids = data.image_ids[qids]
    toks = feats[img_ids]
    qs = [data.questions[i] for i in qids]
    answers = _answer_all(bench.model, bench.prompter, toks, qs, 64)
    view = view_uncertainty(bench.model, bench.prompter, toks, qs, answers, stats=bench.stats, floor=cfg.ood_floor) \
        if bench.stats is not None else [float("nan")] * len(qs)
    return {"domain": str(chunk.domain), "tokens": toks, "questions": qs, "answers": answers,
            "gold": [data.answers[i] for i in qids], "view": view, "ids": [f"r{chunk.round}-q{int(i)}" for i in qids],
            "png_file": [file_sizes[i] for i in img_ids],
            **{k: [frame_bytes(imgs_all[i], fmt, px) for i in img_ids] for k, (fmt, px) in _FRAMES.items()}}


def _stream_rounds(bench: _Bench, n: int, cfg: UTSConfig, log: Callable[[str], None]) -> list[dict]:
    """Answer about ``n`` requests of the default shift stream, one round per domain."""

    sequence = resolve_sequence("default")
    chunks = scenario_chunks(bench.data, sequence, Scenario("one-round", round_size=max(1, n // len(sequence))))
    file_sizes = _source_png_sizes(len(bench.data.images))
    rounds = []
    for chunk in chunks:
        log(f"round {chunk.round}: {chunk.domain} ({len(chunk.question_ids)} requests)")
        rounds.append(_answer_round(bench, chunk, cfg, file_sizes))
    return rounds


def _plan_and_pack(tokens, questions, answers, ids, c: UTSConfig, stats, bridge) -> tuple[list, bytes]:
    """The UTS work on one batch (score, select, quantize, pack): the picked samples and their packet."""
    picked = plan_uplink(tokens, questions, answers, ids, c, stats=stats, bridge=bridge)
    return picked, (build_uplink(picked, c, device_id="bench", adapter_version="v0") if picked else b"")


def _upload(rounds: list[dict], c: UTSConfig, bench: _Bench) -> tuple[list[bytes], list]:
    """Every round's uplink packet under ``c`` (rounds with no upload send none) and all uploaded samples."""
    packets, samples = [], []
    for r in rounds:
        picked, packet = _plan_and_pack(r["tokens"], r["questions"], r["answers"], r["ids"], c, bench.stats,
                                        bench.model.bridge)
        if picked:
            packets.append(packet)
            samples += picked
    return packets, samples


def _uploaded_accuracy(bench: _Bench, packets: list[bytes], gold_by_id: dict[str, str]) -> float:
    """MC accuracy of the fidelity model on the samples decoded from ``packets``: what the kept tokens carry."""
    right = total_n = 0
    for p in packets:
        batch = decode_uplink(p, stats=bench.stats)
        g = [gold_by_id[i] for i in batch.sample_ids]
        right += _mc_accuracy(bench.fidelity_model, model_prompter(bench.fidelity_model, bench.prompter.candidates), batch, g) * len(g)
        total_n += len(g)
    return round(right / total_n, 4)


def _token_keep_rows(bench: _Bench, rounds: list[dict], cfg: UTSConfig, keep_ratios, fidelity: bool,
                     log: Callable[[str], None]) -> tuple[dict, dict]:
    """Per token scorer × keep ratio: bytes per uploaded sample and (``fidelity``) MC accuracy on the uploads."""
    gold_by_id = {i: g for r in rounds for i, g in zip(r["ids"], r["gold"])}
    per_scorer_bytes, per_scorer_acc = {}, {}
    full_acc = None                 # keep ratio 1.0 uploads every token: the same for every token scorer
    for scorer in TOKEN_SCORER_NAMES:
        per_scorer_bytes[scorer], per_scorer_acc[scorer] = {}, {}
        for ratio in keep_ratios:
            packets, samples = _upload(rounds, replace(cfg, token_scorer=scorer, keep_ratio=ratio), bench)
            key = f"{ratio:g}"
            per_scorer_bytes[scorer][key] = round(sum(map(len, packets)) / len(samples), 1) if samples else None
            if fidelity and samples:
                acc = full_acc if ratio == 1.0 and full_acc is not None else _uploaded_accuracy(bench, packets, gold_by_id)
                per_scorer_acc[scorer][key] = acc
                if ratio == 1.0:
                    full_acc = acc
        log(f"token scorer {scorer}: {per_scorer_bytes[scorer]}")
    return per_scorer_bytes, per_scorer_acc


def _timing_rows(bench: _Bench, r0: dict, cfg: UTSConfig, repeats: int, batch_size: int, upload_rate: float) -> dict:
    """UTS work per request against the device's own answer time on the same batch of the first round."""

    b = min(batch_size, len(r0["questions"]))
    toks, qs, ans, ids = r0["tokens"][:b], r0["questions"][:b], r0["answers"][:b], r0["ids"][:b]
    t_answer = _median_time(lambda: answer_batch(bench.model, bench.prompter, toks, qs), repeats) / b
    t_view = _median_time(lambda: view_uncertainty(bench.model, bench.prompter, toks, qs, ans, stats=bench.stats),
                          repeats) / b if bench.stats is not None else float("nan")
    # worst case: every request of the batch is token-scored, quantized and packed (all uploaded)
    uts_ms = {}
    for scorer in TOKEN_SCORER_NAMES:
        c = replace(cfg, token_scorer=scorer, selection="budget", budget=b)
        uts_ms[scorer] = _median_time(partial(_plan_and_pack, toks, qs, ans, ids, c, bench.stats, bench.model.bridge),
                                      repeats) / b
    overhead = uts_ms[cfg.token_scorer] / t_answer
    return {"batch_size": b, "repeats": repeats, "threads": torch.get_num_threads(),
            "answer_ms_per_request": round(t_answer * 1e3, 3),
            "uts_ms_per_request_all_uploaded": {k: round(v * 1e3, 3) for k, v in uts_ms.items()},
            "overhead": round(overhead, 4),
            "overhead_by_token_scorer": {k: round(v / t_answer, 4) for k, v in uts_ms.items()},
            "overhead_at_upload_rate": round(overhead * upload_rate, 4),
            "view_consistency_ms_per_request": round(t_view * 1e3, 3),
            "view_consistency_overhead": round(t_view / t_answer, 4)}


def _device_rows(which: str, rounds: list[dict], wrong: list[bool]) -> dict:
    """Which device answered the stream, and how well (MC and direct answers)."""
    n_req = len(wrong)
    answers, gold = _flat(rounds, "answers"), _flat(rounds, "gold")
    return {"model": which, "n": n_req, "domains": [r["domain"] for r in rounds],
            "device_mc_accuracy": round(1 - sum(wrong) / n_req, 4),
            "device_da_accuracy": round(sum(a.text == normalize_answer(g) for a, g in zip(answers, gold)) / n_req, 4)}


def _auroc_rows(rounds: list[dict], wrong: list[bool], cfg: UTSConfig) -> dict:
    """Every sample scorer's AUROC for the device's wrong answers (with a bootstrap interval) and the
    upload rate the opt-in view_consistency scorer would have."""
    answers, view = _flat(rounds, "answers"), _flat(rounds, "view")
    aurocs = {name: auroc(sample_uncertainty(answers, name), wrong) for name in SAMPLE_SCORERS}
    aurocs["view_consistency"] = auroc(view, wrong)
    view_cfg = replace(cfg, sample_scorer="view_consistency")
    return {"auroc": {k: round(v, 4) for k, v in aurocs.items()}, "best_sample_scorer": _best(aurocs, aurocs),
            "auroc_ci95": {k: _auroc_ci(sample_uncertainty(answers, k) if k in SAMPLE_SCORERS else view, wrong)
                           for k in aurocs},
            "best_answer_only_scorer": _best(aurocs, SAMPLE_SCORERS),
            "view_consistency_upload_rate": round(sum(v > view_cfg.threshold for v in view) / len(wrong), 4)}


def _per_uploaded(total: int, samples: list) -> float:   # uplink bytes per uploaded sample
    return total / len(samples) if samples else 0.0


def _default_row(cfg: UTSConfig, rounds: list[dict], wrong: list[bool], samples: list, total: int) -> dict:
    """The default setting: its config, how many requests it uploads, the wrong answers among them, the bytes."""
    n_req = len(wrong)
    picked_ids = {s.sample_id for s in samples}
    caught = sum(w for i, w in zip(_flat(rounds, "ids"), wrong) if i in picked_ids)
    return {**asdict(cfg), "uploaded": len(samples), "upload_rate": round(len(samples) / n_req, 4),
            "wrong_caught": round(caught / max(1, sum(wrong)), 4),
            "uplink_bytes": total, "bytes_per_request": round(total / n_req, 1),
            "bytes_per_uploaded_sample": round(_per_uploaded(total, samples), 1)}


def _device_mc_on_uploaded(rounds: list[dict], samples: list) -> float:
    """The device's own MC accuracy on the samples the default setting uploads."""
    picked = {s.sample_id for s in samples}
    rows = zip(_flat(rounds, "ids"), _flat(rounds, "answers"), _flat(rounds, "gold"))
    return round(sum(a.mc == g for i, a, g in rows if i in picked) / max(1, len(samples)), 4)


def _image_bytes(rounds: list[dict]) -> dict[str, int]:
    """Total bytes of the stream's images: shifted 64×64 PNG, easy-VQA's clean source file, 224×224 JPEG."""
    return {k: sum(_flat(rounds, key)) for k, key in (("png", "png_64"), ("png_file", "png_file"), ("jpeg224", "jpeg_224"))}


def _frame_rows(rounds: list[dict], samples: list, per_upload: float) -> dict:
    """Bytes per upload next to the same uploaded frames (all when none is) as PNG / JPEG q90 at 64 and 224 px."""
    picked, ids = {s.sample_id for s in samples}, _flat(rounds, "ids")
    sizes = {key: [b for i, b in zip(ids, _flat(rounds, key)) if i in picked or not picked] for key in _FRAMES}
    return {"bytes_per_upload": round(per_upload, 1), **{f"{k}_bytes": round(sum(v) / len(v), 1) for k, v in sizes.items()}}


def _code_rows(bench: _Bench, rounds: list[dict], cfg: UTSConfig, codes, fidelity: bool) -> dict:
    """Per token code: bytes per uploaded sample and the fidelity model's MC accuracy on its uploads."""
    gold_by_id = {i: g for r in rounds for i, g in zip(r["ids"], r["gold"])}
    rows = {}
    for code in codes:
        full = code.startswith("full-")
        packets, samples = _upload(rounds, replace(cfg, token_code="full" if full else code,
                                                   token_dtype=code[5:] if full else cfg.token_dtype), bench)
        if samples:
            rows[code] = {"code_used": decode_uplink(packets[0], stats=bench.stats).code,
                          "bytes_per_upload": round(sum(map(len, packets)) / len(samples), 1),
                          "uploaded_mc_accuracy": _uploaded_accuracy(bench, packets, gold_by_id) if fidelity else None}
    return rows


def _ratio_rows(rounds: list[dict], images: dict[str, int], total: int) -> dict:
    """Default uplink bytes against uploading every request's full fp32 tokens or one of its images."""
    n_req = len(_flat(rounds, "ids"))
    full_bytes = int(np.prod(rounds[0]["tokens"].shape[1:])) * 4     # one request's tokens as fp32 (250,880 B)
    return {"full_tokens_bytes_per_request": full_bytes,
            "png_bytes_per_request": round(images["png"] / n_req, 1),
            "png_source_file_bytes_per_request": round(images["png_file"] / n_req, 1),
            "jpeg224_bytes_per_request": round(images["jpeg224"] / n_req, 1),
            "ratio_full_tokens": round(total / (n_req * full_bytes), 5),
            "ratio_png": round(total / images["png"], 4), "ratio_png_source_file": round(total / images["png_file"], 4),
            "ratio_jpeg224": round(total / images["jpeg224"], 4)}


def _notes(images: dict[str, int], n_req: int, per_uploaded: float, fid_name: str) -> list[str]:
    """What a reader needs to read the numbers right."""
    png_per_req, src_per_req = images["png"] / n_req, images["png_file"] / n_req
    return [
        f"ratio_png compares with the 64x64 PNG of the shifted image the device saw ({png_per_req:.0f} B on "
        f"average); ratio_png_source_file with easy-VQA's own clean PNG files ({src_per_req:.0f} B). An uploaded "
        f"sample's coded tokens cost {per_uploaded:.0f} B ({per_uploaded / png_per_req:.1f}x the shifted PNG); "
        "the raw image never leaves the device and the cloud consumes encoder tokens directly; the per-request "
        "ratios include that only uncertain samples are uploaded.",
        "bytes_per_uploaded_sample depends on the token scorer only through the entropy code (each keeps the "
        f"same number of tokens; a pcaK-ec code costs what its tokens' coefficients need); uploaded_mc_accuracy (what the kept tokens carry) is measured with the {fid_name} "
        "model" + (" (no cloud weights yet: a device-side proxy)" if fid_name == "device" else "") + ".",
        "auroc.view_consistency needs one extra MC forward per request (timing.view_consistency_overhead), "
        "so it is opt-in; the answer-only scorers cost nothing beyond the answer.",
        "timings: medians of repeats on a CPU shared with other jobs; torch threads = "
        f"{torch.get_num_threads()}.",
    ]


def run_bench(n: int = 400, *, model=None, prompter=None, fidelity_model=None, tokens_for=None, stats=None,
              cfg: UTSConfig | None = None, repeats: int = 5, batch_size: int = 32,
              keep_ratios=KEEP_RATIOS, fidelity: bool = True, log: Callable[[str], None] | None = None,
              codes=CODES, torch_device: str = "cpu") -> dict:
    """Run the UTS benchmark; returns a JSON-ready dict (see the module docstring).

    Defaults load the real pretrained device, the packaged token statistics and cached features;
    tests pass a tiny ``model`` with matching ``tokens_for(domain) -> (n_images, P, C)`` and ``stats``.
    The measured parts run in this order (it fixes what each draws from the random generators):
    the stream, the default upload, the token-keep rows, the timing.
    """
    log = log or (lambda _msg: None)
    cfg = cfg or UTSConfig()
    bench = _load(model, prompter, fidelity_model, tokens_for, stats, fidelity, torch_device)
    rounds = _stream_rounds(bench, n, cfg, log)
    packets, samples = _upload(rounds, cfg, bench)
    per_scorer_bytes, per_scorer_acc = _token_keep_rows(bench, rounds, cfg, keep_ratios, fidelity, log)
    code_rows = _code_rows(bench, rounds, cfg, codes, fidelity)
    wrong = [a.mc != g for a, g in zip(_flat(rounds, "answers"), _flat(rounds, "gold"))]
    total, n_req = sum(map(len, packets)), len(wrong)
    timing = _timing_rows(bench, rounds[0], cfg, repeats, batch_size, upload_rate=len(samples) / n_req)
    images = _image_bytes(rounds)
    return {
        **_device_rows(bench.which, rounds, wrong), **_auroc_rows(rounds, wrong, cfg),
        "default": _default_row(cfg, rounds, wrong, samples, total),
        **_frame_rows(rounds, samples, _per_uploaded(total, samples)), "codes": code_rows,
        "bytes_per_uploaded_sample": per_scorer_bytes,
        "uploaded_mc_accuracy": per_scorer_acc, "fidelity_model": bench.fid_name,
        "device_mc_accuracy_on_uploaded": _device_mc_on_uploaded(rounds, samples),
        **_ratio_rows(rounds, images, total),
        "timing": timing,
        "notes": _notes(images, n_req, _per_uploaded(total, samples), bench.fid_name),
    }
