"""One UTS round on the device: score and select samples, then their tokens, turning answered
requests into the :class:`UplinkSample` list that :func:`build_uplink` packs."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from cdcca.model.answer import Answer
from cdcca.uplink.codec import packet_code
from cdcca.uplink.config import UTSConfig
from cdcca.uplink.packet import UplinkSample, _utf8, sample_cost
from cdcca.uplink.samples import sample_uncertainty, select_samples, view_uncertainty
from cdcca.uplink.tokens import TokenStats, n_keep, score_tokens, select_tokens


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image as PNG file bytes (only ever uploaded when allow_image=True)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def frame_bytes(image: np.ndarray, fmt: str = "JPEG", size: int = 224, quality: int = 90) -> int:
    """What the frame itself would cost on the link: file bytes of a uint8 (H, W, 3) image as PNG or
    JPEG (quality 90) at ``size`` px (bilinear), to set next to an upload's coded tokens."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image))
    img = img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return len(buf.getvalue())


def plan_uplink(tokens: torch.Tensor, questions: Sequence[str], answers: Sequence[Answer],
                sample_ids: Sequence[str], cfg: UTSConfig, *, stats: TokenStats | None = None,
                bridge: torch.nn.Module | None = None, images: Sequence[np.ndarray] | None = None,
                uncertainty: Sequence[float] | None = None, model: torch.nn.Module | None = None,
                prompter=None) -> list[UplinkSample]:
    """Run UTS over one round of answered requests: score and select samples, then score and select
    the tokens of the selected ones. Confident samples stay on the device (they are not returned).

    tokens (B, P, C); ``uncertainty`` may be passed when already computed (else cfg.sample_scorer;
    ``view_consistency`` needs the device ``model`` and ``prompter``). ``bridge`` defaults to the
    model's for the ``mc_dropout`` token scorer.
    """
    B = len(questions)
    if tokens.ndim != 3 or len(tokens) != B or len(answers) != B or len(sample_ids) != B:
        raise ValueError(f"need one token set, answer and id per question; got tokens {tuple(tokens.shape)}, "
                         f"{B} questions, {len(answers)} answers, {len(sample_ids)} ids")
    if bridge is None and model is not None:
        bridge = model.bridge
    if uncertainty is not None:
        u = list(uncertainty)
    elif cfg.sample_scorer == "view_consistency":
        if model is None or prompter is None:
            raise ValueError("sample_scorer='view_consistency' needs plan_uplink(..., model=device, prompter=prompter)")
        u = view_uncertainty(model, prompter, tokens, questions, answers, stats=stats, floor=cfg.ood_floor)
    else:
        u = sample_uncertainty(answers, cfg.sample_scorer)
    costs = None
    if cfg.selection == "bytes":
        k = n_keep(cfg.keep_ratio, tokens.shape[1])
        code = packet_code(cfg, tokens.shape[2])[0].name
        costs = [sample_cost(k, tokens.shape[2], text_bytes=len(_utf8({"id": str(i), "q": q, "a": a.text, "mc": a.mc})) + 1,
                             code=code)
                 for i, q, a in zip(sample_ids, questions, answers)]
    picked = select_samples(u, cfg, costs=costs)
    if not picked:
        return []
    sel = tokens[picked]
    keep = select_tokens(score_tokens(sel, cfg, stats=stats, bridge=bridge), cfg.keep_ratio, cfg.direction)
    out = []
    for j, i in enumerate(picked):
        img = png_bytes(images[i]) if cfg.allow_image and images is not None else None
        out.append(UplinkSample(str(sample_ids[i]), tokens[i], questions[i], answers[i].text,
                                float(answers[i].confidence), float(u[i]), keep[j], answers[i].mc, img))
    return out
