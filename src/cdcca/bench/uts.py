"""``cdcca bench uts``: what UTS uploads on the default shift stream, what it costs, and how well it picks.

On the default stream (``resolve_sequence("default")``, stream questions from ``build_stream``) the
device answers every request; then

* ``auroc``: for every sample scorer, the AUROC of its uncertainty for predicting the device's wrong
  multiple-choice answers (1.0 = every wrong answer is more uncertain than every right one), the
  opt-in two-view ``view_consistency`` scorer included;
* ``bytes_per_uploaded_sample``: per token scorer × keep ratio, uplink bytes per uploaded sample, and
  ``uploaded_mc_accuracy``: MC accuracy of the fidelity model (the cloud when its weights exist,
  otherwise the device) on the uploaded samples from the decoded packet — how much the kept tokens
  still carry;
* ``ratio_full_tokens`` / ``ratio_png`` / ``ratio_jpeg224``: uplink bytes per request at the default
  setting against uploading every request's full fp32 tokens, its native 64×64 PNG, or a 224×224
  JPEG (q=90) of the same (shifted) image;
* ``timing``: UTS work per request (sample scoring, token scoring, selection, quantization, packing)
  as a fraction of the device's own answer time, medians over repeats at the same batch size.
  ``overhead`` is the worst case — every request uploaded — for the default token scorer;
  ``overhead_at_upload_rate`` scales it by the stream's measured upload rate.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import numpy as np
import torch

from cdcca.metrics import auroc
from cdcca.uplink import (
    SAMPLE_SCORERS,
    TOKEN_SCORER_NAMES,
    UTSConfig,
    build_uplink,
    decode_uplink,
    plan_uplink,
    png_bytes,
    sample_uncertainty,
    view_uncertainty,
)

KEEP_RATIOS = (0.25, 0.5, 0.75, 1.0)


def jpeg224_bytes(image: np.ndarray, quality: int = 90) -> int:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).resize((224, 224), Image.BILINEAR).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue())


def _source_png_sizes(n_images: int) -> list[int]:
    """Bytes of easy-VQA's own test PNG files (clean, 64×64)."""
    import os

    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    return [os.path.getsize(paths[i]) for i in range(n_images)]


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
    from cdcca.model.answer import answer_batch

    out = []
    for s in range(0, len(questions), batch_size):
        out += answer_batch(model, prompter, tokens[s:s + batch_size], questions[s:s + batch_size])
    return out


def _mc_accuracy(model, prompter, batch, gold: list[str], batch_size: int = 64) -> float:
    from cdcca.model.answer import mc_predict

    right = 0
    for s in range(0, len(gold), batch_size):
        probs = mc_predict(model, prompter, batch.tokens[s:s + batch_size], batch.questions[s:s + batch_size],
                           keep=batch.keep[s:s + batch_size])
        right += sum(prompter.candidates[int(i)] == g for i, g in zip(probs.argmax(-1), gold[s:s + batch_size]))
    return right / max(1, len(gold))


def run_bench(n: int = 400, *, model=None, prompter=None, fidelity_model=None, tokens_for=None, stats=None,
              cfg: UTSConfig | None = None, repeats: int = 5, batch_size: int = 32,
              keep_ratios=KEEP_RATIOS, fidelity: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run the UTS benchmark; returns a JSON-ready dict (see the module docstring).

    Defaults load the real pretrained device, the packaged token statistics and cached features;
    tests pass a tiny ``model`` with matching ``tokens_for(domain) -> (n_images, P, C)`` and ``stats``.
    """
    from cdcca.assets import load_tokenizer
    from cdcca.data.corruptions import corrupt
    from cdcca.data.easyvqa import load_split
    from cdcca.data.stream import build_stream, resolve_sequence
    from cdcca.evaluate import test_tokens
    from cdcca.model.pair import load_pretrained, weights_file
    from cdcca.model.prompt import Prompter
    from cdcca.uplink import default_token_stats

    log = log or (lambda _msg: None)
    cfg = cfg or UTSConfig()
    which = "given"
    if model is None:
        model, which = load_pretrained("device"), "pretrained device"
    data = load_split("test")
    prompter = prompter or Prompter(load_tokenizer(), data.candidates)
    tokens_for = tokens_for or test_tokens
    fid_name = "device"
    if fidelity and fidelity_model is None:
        if which == "pretrained device" and weights_file("cloud").is_file():
            fidelity_model, fid_name = load_pretrained("cloud"), "pretrained cloud"
        else:
            fidelity_model = model
    elif fidelity_model is not None:
        fid_name = "given"
    C = model.bridge.cfg.token_dim
    if stats is None and C == 1280:
        stats = default_token_stats()

    sequence = resolve_sequence("default")
    per_domain = max(1, n // len(sequence))
    chunks = build_stream(data, sequence, per_domain)
    file_sizes = _source_png_sizes(len(data.images))
    rounds = []
    for chunk in chunks:
        log(f"round {chunk.round}: {chunk.domain} ({len(chunk.question_ids)} requests)")
        feats = tokens_for(chunk.domain)
        imgs_all = corrupt(data.images, chunk.domain.corruption, chunk.domain.severity, 0)
        qids = chunk.question_ids
        img_ids = data.image_ids[qids]
        toks = feats[img_ids]
        qs = [data.questions[i] for i in qids]
        answers = _answer_all(model, prompter, toks, qs, 64)
        view = view_uncertainty(model, prompter, toks, qs, answers, stats=stats, floor=cfg.ood_floor) \
            if stats is not None else [float("nan")] * len(qs)
        rounds.append({"domain": str(chunk.domain), "tokens": toks, "questions": qs, "answers": answers,
                       "gold": [data.answers[i] for i in qids], "view": view, "ids": [f"r{chunk.round}-q{int(i)}" for i in qids],
                       "png": [len(png_bytes(imgs_all[i])) for i in img_ids],
                       "png_file": [file_sizes[i] for i in img_ids],
                       "jpeg224": [jpeg224_bytes(imgs_all[i]) for i in img_ids]})

    all_answers = [a for r in rounds for a in r["answers"]]
    gold = [g for r in rounds for g in r["gold"]]
    wrong = [a.mc != g for a, g in zip(all_answers, gold)]
    n_req = len(all_answers)
    aurocs = {name: auroc(sample_uncertainty(all_answers, name), wrong) for name in SAMPLE_SCORERS}
    aurocs["view_consistency"] = auroc([v for r in rounds for v in r["view"]], wrong)
    best = max(aurocs, key=lambda k: -1 if np.isnan(aurocs[k]) else aurocs[k])
    best_answer_only = max(SAMPLE_SCORERS, key=lambda k: -1 if np.isnan(aurocs[k]) else aurocs[k])
    view_cfg = replace(cfg, sample_scorer="view_consistency")
    view_uploaded = sum(v > view_cfg.threshold for r in rounds for v in r["view"])

    def upload(c: UTSConfig):
        packets, samples = [], []
        for r in rounds:
            picked = plan_uplink(r["tokens"], r["questions"], r["answers"], r["ids"], c, stats=stats,
                                 bridge=model.bridge)
            if picked:
                packets.append(build_uplink(picked, c, device_id="bench", adapter_version="v0"))
                samples += picked
        return packets, samples

    gold_by_id = {i: g for r in rounds for i, g in zip(r["ids"], r["gold"])}
    default_packets, default_samples = upload(cfg)
    total = sum(map(len, default_packets))
    per_scorer_bytes, per_scorer_acc = {}, {}
    full_acc = None                 # keep ratio 1.0 uploads every token: the same for every token scorer
    for scorer in TOKEN_SCORER_NAMES:
        per_scorer_bytes[scorer], per_scorer_acc[scorer] = {}, {}
        for ratio in keep_ratios:
            c = replace(cfg, token_scorer=scorer, keep_ratio=ratio)
            packets, samples = upload(c)
            key = f"{ratio:g}"
            per_scorer_bytes[scorer][key] = round(sum(map(len, packets)) / len(samples), 1) if samples else None
            if fidelity and samples and ratio == 1.0 and full_acc is not None:
                per_scorer_acc[scorer][key] = full_acc
            elif fidelity and samples:
                right = total_n = 0
                for p in packets:
                    batch = decode_uplink(p, stats=stats)
                    g = [gold_by_id[i] for i in batch.sample_ids]
                    right += _mc_accuracy(fidelity_model, prompter, batch, g) * len(g)
                    total_n += len(g)
                per_scorer_acc[scorer][key] = round(right / total_n, 4)
                if ratio == 1.0:
                    full_acc = per_scorer_acc[scorer][key]
        log(f"token scorer {scorer}: {per_scorer_bytes[scorer]}")

    png_total = sum(b for r in rounds for b in r["png"])
    src_png_total = sum(b for r in rounds for b in r["png_file"])
    jpeg_total = sum(b for r in rounds for b in r["jpeg224"])
    picked_ids = {s.sample_id for s in default_samples}
    device_right_uploaded = sum(a.mc == g for r in rounds for i, a, g in zip(r["ids"], r["answers"], r["gold"])
                                if i in picked_ids)
    ids_flat = [i for r in rounds for i in r["ids"]]
    caught = sum(w for i, w in zip(ids_flat, wrong) if i in picked_ids)

    # timing: the same batch, answered by the device vs. the UTS work on it, per request
    r0 = rounds[0]
    b = min(batch_size, len(r0["questions"]))
    toks, qs, ans, ids = r0["tokens"][:b], r0["questions"][:b], r0["answers"][:b], r0["ids"][:b]
    from cdcca.model.answer import answer_batch

    t_answer = _median_time(lambda: answer_batch(model, prompter, toks, qs), repeats) / b
    t_view = _median_time(lambda: view_uncertainty(model, prompter, toks, qs, ans, stats=stats), repeats) / b \
        if stats is not None else float("nan")

    def uts_work(c: UTSConfig):
        def go():
            picked = plan_uplink(toks, qs, ans, ids, c, stats=stats, bridge=model.bridge)
            return build_uplink(picked, c, device_id="bench", adapter_version="v0") if picked else b""
        return go

    # worst case: every request of the batch is token-scored, quantized and packed (all uploaded)
    uts_ms = {}
    for scorer in TOKEN_SCORER_NAMES:
        c = replace(cfg, token_scorer=scorer, selection="budget", budget=b)
        uts_ms[scorer] = _median_time(uts_work(c), repeats) / b
    overhead = uts_ms[cfg.token_scorer] / t_answer
    upload_rate = len(default_samples) / n_req

    png_per_req, per_uploaded = png_total / n_req, (total / len(default_samples) if default_samples else 0.0)
    src_per_req = src_png_total / n_req
    notes = [
        f"ratio_png compares with the 64x64 PNG of the shifted image the device saw ({png_per_req:.0f} B on "
        f"average); ratio_png_source_file with easy-VQA's own clean PNG files ({src_per_req:.0f} B). An uploaded "
        f"sample's kept tokens cost {per_uploaded:.0f} B ({per_uploaded / png_per_req:.0f}x the shifted PNG): "
        "tokens cost MORE than the tiny native PNG would. UTS uploads tokens anyway because the raw image never "
        "leaves the device and the cloud consumes encoder tokens directly; the per-request ratios include "
        "that only uncertain samples are uploaded.",
        "bytes_per_uploaded_sample does not depend on the token scorer (no entropy coding; each keeps the "
        "same number of tokens); uploaded_mc_accuracy shows what the kept tokens carry.",
        f"uploaded_mc_accuracy is measured with the {fid_name} model"
        + (" (no cloud weights yet: a device-side proxy)" if fid_name == "device" else "") + ".",
        "auroc.view_consistency needs one extra MC forward per request (timing.view_consistency_overhead), "
        "so it is opt-in; the answer-only scorers cost nothing beyond the answer.",
        "timings: medians of repeats on a CPU shared with other jobs; torch threads = "
        f"{torch.get_num_threads()}.",
    ]
    cfg_dict = asdict(cfg)
    full_bytes = int(np.prod(r0["tokens"].shape[1:])) * 4     # one request's tokens as fp32 (250,880 B)
    return {
        "model": which, "n": n_req, "domains": [r["domain"] for r in rounds],
        "device_mc_accuracy": round(1 - sum(wrong) / n_req, 4),
        "device_da_accuracy": round(sum(a.text == g for a, g in zip(all_answers, gold)) / n_req, 4),
        "auroc": {k: round(v, 4) for k, v in aurocs.items()}, "best_sample_scorer": best,
        "auroc_ci95": {k: _auroc_ci(sample_uncertainty(all_answers, k) if k in SAMPLE_SCORERS
                                    else [v for r in rounds for v in r["view"]], wrong) for k in aurocs},
        "best_answer_only_scorer": best_answer_only,
        "view_consistency_upload_rate": round(view_uploaded / n_req, 4),
        "default": {**cfg_dict, "uploaded": len(default_samples), "upload_rate": round(upload_rate, 4),
                    "wrong_caught": round(caught / max(1, sum(wrong)), 4),
                    "uplink_bytes": total, "bytes_per_request": round(total / n_req, 1),
                    "bytes_per_uploaded_sample": round(per_uploaded, 1)},
        "bytes_per_uploaded_sample": per_scorer_bytes,
        "uploaded_mc_accuracy": per_scorer_acc, "fidelity_model": fid_name,
        "device_mc_accuracy_on_uploaded": round(device_right_uploaded / max(1, len(default_samples)), 4),
        "full_tokens_bytes_per_request": full_bytes,
        "png_bytes_per_request": round(png_per_req, 1), "png_source_file_bytes_per_request": round(src_per_req, 1), "jpeg224_bytes_per_request": round(jpeg_total / n_req, 1),
        "ratio_full_tokens": round(total / (n_req * full_bytes), 5),
        "ratio_png": round(total / png_total, 4), "ratio_png_source_file": round(total / src_png_total, 4),
        "ratio_jpeg224": round(total / jpeg_total, 4),
        "timing": {"batch_size": b, "repeats": repeats, "threads": torch.get_num_threads(),
                   "answer_ms_per_request": round(t_answer * 1e3, 3),
                   "uts_ms_per_request_all_uploaded": {k: round(v * 1e3, 3) for k, v in uts_ms.items()},
                   "overhead": round(overhead, 4),
                   "overhead_by_token_scorer": {k: round(v / t_answer, 4) for k, v in uts_ms.items()},
                   "overhead_at_upload_rate": round(overhead * upload_rate, 4),
                   "view_consistency_ms_per_request": round(t_view * 1e3, 3),
                   "view_consistency_overhead": round(t_view / t_answer, 4)},
        "notes": notes,
    }
