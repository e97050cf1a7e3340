"""The paper's label-phase loss as a module (torchtune keeps its KD losses apart from the recipe the same way):

    loss = w_ce · CE(pseudo-label tokens)
         + w_mse · MSE(aligner(h_s), h_t) + w_wave · Σ_j L1(DWT_j(aligner(h_s)), DWT_j(h_t))   (j = 3 'db6' high bands)
         + w_kl · T² · KL(p_t^T ‖ p_s^T) over the answer candidates at the answer position

Nothing needs a shared vocabulary: the KL term compares the two models' distributions over the task's
candidate answers (each scored in its own tokenizer), and the CE term trains on the pseudo-label's text.
Hidden states are compared position by position when both roles share a tokenizer; across tokenizers the
prompts do not line up, so the term compares the visual positions (the teacher's resampled to the student's
query count) and the answer position. The aligner is a trainable 1×1 Conv1d from student width to teacher
width (any widths) that stays on the cloud, one per device; :class:`AKDLoss` holds it, so its parameters are
the loss's.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cdcca.akd.config import LabelPhase
from cdcca.akd.prefix import resample_queries
from cdcca.akd.records import TeacherRecord
from cdcca.model.mllm import MLLM


def answer_loss_per_sample(model: MLLM, fwd, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE averaged over each sample's own answer tokens: (B,). Its mean over equal-length
    answers is :func:`cdcca.model.mllm.answer_loss`; per sample, so that samples can be weighted."""
    text = fwd.normed[:, fwd.n_visual:]
    target = labels[:, 1:]
    sel = target != -100                                          # (B, T-1); lm_head only where labelled
    ce = F.cross_entropy(model.logits(text[:, :-1][sel]).float(), target[sel], reduction="none")
    owner = sel.nonzero()[:, 0]
    total = torch.zeros(len(labels), dtype=ce.dtype, device=ce.device).index_add(0, owner, ce)
    return total / sel.sum(1).clamp_min(1)


class Aligner(nn.Module):
    """1×1 convolution mapping student hidden width to teacher width (identity-initialised when equal)."""

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        self.conv = nn.Conv1d(d_student, d_teacher, kernel_size=1)
        if d_student == d_teacher:
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(d_student)[..., None])
                self.conv.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:      # (B, L, d_s) → (B, L, d_t)
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


def wavelet_highband_l1(student: torch.Tensor, teacher: torch.Tensor, wavelet: str = "db6", levels: int = 3) -> torch.Tensor:
    """Σ over ``levels`` of mean |detail coefficients| difference along the sequence axis. Inputs (B, L, d)."""
    import ptwt  # loaded on first use: only the wavelet term of the label phase (off by default) needs it

    s = ptwt.wavedec(student.transpose(1, 2).float(), wavelet, level=levels, mode="zero")   # [cA, cD_levels..cD1]
    t = ptwt.wavedec(teacher.transpose(1, 2).float(), wavelet, level=levels, mode="zero")
    return sum(F.l1_loss(a, b) for a, b in zip(s[1:], t[1:]))


def cema_weights(batch: list[TeacherRecord], n_candidates: int) -> torch.Tensor:
    """CEMA's per-sample weights 1/exp(H_teacher − E0), E0 = 0.4·ln(#candidates), normalised to mean 1: (B,)."""
    e0 = 0.4 * math.log(n_candidates)
    w = torch.tensor([math.exp(-(r.entropy - e0)) for r in batch])
    return w / w.mean()


class AKDLoss(nn.Module):
    """The switchable terms of the label phase for one batch of the student's forward passes
    (zero-weighted terms are skipped, not computed)."""

    def __init__(self, cfg: LabelPhase, aligner: Aligner, candidate_ids: torch.Tensor, shared_tokenizer: bool = True):
        super().__init__()
        self.cfg = cfg
        self.aligner = aligner
        self.candidate_ids = candidate_ids        # first token of each answer candidate, in the student's vocabulary
        self.shared_tokenizer = shared_tokenizer  # the teacher's prompt positions line up with the student's

    def forward(self, student: MLLM, fwd, text, batch: list[TeacherRecord]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        B = len(batch)
        weights = self.weights(batch)
        terms: dict[str, torch.Tensor] = {}
        if cfg.w_ce:
            terms["ce"] = cfg.w_ce * (weights * self._ce(student, fwd, text, batch)).mean()
        if cfg.w_kl:
            s_logits = student.logits(fwd.normed[torch.arange(B), fwd.n_visual + text.answer_start]).float()
            s_logits = s_logits[:, self.candidate_ids]                                   # (B, n_cand)
            t_logits = torch.stack([r.logits for r in batch]).float().to(s_logits.device)  # (B, n_cand)
            T = cfg.temperature
            kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1),
                          log_target=True, reduction="none").sum(-1)
            terms["kl"] = cfg.w_kl * T * T * (weights * kl).mean()
        if cfg.w_mse or cfg.w_wave:
            h_s, h_t, mask = aligned_hidden(fwd, text, batch) if self.shared_tokenizer else \
                visual_and_answer_hidden(fwd, text, batch)
            h_s = self.aligner(h_s) * mask
            scale = h_t.pow(2).sum() / (mask.sum() * h_t.shape[-1])
            h_s, h_t = h_s / scale.sqrt(), h_t / scale.sqrt()
            if cfg.w_mse:
                terms["mse"] = cfg.w_mse * ((h_s - h_t).pow(2).sum() / (mask.sum() * h_t.shape[-1]))
            if cfg.w_wave:
                terms["wave"] = cfg.w_wave * wavelet_highband_l1(h_s, h_t, cfg.wavelet, cfg.wave_levels)
        return terms

    def weights(self, batch: list[TeacherRecord]) -> torch.Tensor:
        """Per-sample loss weights (B,): ones, or CEMA's when ``weighting="entropy"``."""
        if self.cfg.weighting == "none":
            return torch.ones(len(batch))
        return cema_weights(batch, len(self.candidate_ids))

    def _ce(self, student: MLLM, fwd, text, batch: list[TeacherRecord]) -> torch.Tensor:
        """Per-sample CE (B,): on the pseudo-label's tokens, or on the teacher's candidate distribution."""
        if self.cfg.targets == "soft" and all(r.probs is not None for r in batch):
            B = len(batch)
            s_logits = student.logits(fwd.normed[torch.arange(B), fwd.n_visual + text.answer_start]).float()
            log_p = s_logits[:, self.candidate_ids].log_softmax(-1)
            return -(torch.stack([r.probs for r in batch]).float().to(log_p.device) * log_p).sum(-1)
        return answer_loss_per_sample(student, fwd, text.labels)


def aligned_hidden(fwd, text, batch: list[TeacherRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher hidden states over visual + prompt positions, left-padded to one length:
    (B, L, d_s), (B, L, d_t) and the (B, L, 1) mask of real positions."""
    Q = fwd.n_visual
    lengths = [r.hidden.shape[0] for r in batch]
    L = max(lengths)
    B, d_s = len(batch), fwd.hidden.shape[-1]
    h_s = fwd.hidden.new_zeros(B, L, d_s)
    h_t = fwd.hidden.new_zeros(B, L, batch[0].hidden.shape[-1], dtype=torch.float32)
    mask = fwd.hidden.new_zeros(B, L, 1, dtype=torch.float32)
    for i, r in enumerate(batch):
        n_prompt = lengths[i] - Q
        start = int(text.answer_start[i]) - n_prompt + 1          # first prompt token in the text
        pos = torch.cat([torch.arange(Q), Q + torch.arange(start, start + n_prompt)])
        h_s[i, L - lengths[i]:] = fwd.hidden[i, pos]
        h_t[i, L - lengths[i]:] = r.hidden.float()
        mask[i, L - lengths[i]:] = 1
    return h_s, h_t, mask


def visual_and_answer_hidden(fwd, text, batch: list[TeacherRecord]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Across tokenizers: the student's and the teacher's hidden states at the visual positions (the teacher's
    resampled to the student's query count when the bridges differ) and at the answer position (the last prompt
    token): (B, Q + 1, d_s), (B, Q + 1, d_t) and an all-ones (B, Q + 1, 1) mask."""
    Q, B = fwd.n_visual, len(batch)
    h_s = torch.cat([fwd.hidden[:, :Q], fwd.hidden[torch.arange(B), Q + text.answer_start][:, None]], dim=1)
    rows = []
    for r in batch:
        q_t = r.prefix.shape[0] if r.prefix is not None else Q
        visual = resample_queries(r.hidden[None, :q_t].float(), Q)[0]
        rows.append(torch.cat([visual, r.hidden[-1:].float()]))
    h_t = torch.stack(rows).to(h_s.device)
    return h_s, h_t, h_s.new_ones(B, Q + 1, 1, dtype=torch.float32)
