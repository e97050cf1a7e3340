"""AKD: adapter-based knowledge distillation from the cloud teacher into one device's adapters.

Per uploaded sample the teacher runs **once** (:meth:`AKD.teacher_pass`): from the same visual
tokens the device sent, it picks a pseudo-label (its multiple-choice answer) and we cache its
pre-norm last-layer hidden states over the visual + prompt positions and its logits at the answer
position, and its bridge's output (the visual prefix). The student — a model holding *that device's
current* adapters — then learns in up to two phases, each on the new records plus a bounded replay:

1. **prefix distillation** (``prefix_epochs``; :mod:`cdcca.akd.prefix`): the device's bridge learns to
   produce the teacher's robust prefix, translated into the device's prefix space by a map fitted
   on clean source images — every upload, no label, no LLM pass;
2. **the label phase** (``epochs``; the paper's AKD loss) on the pseudo-labels the teacher is sure of:

    loss = w_ce · CE(pseudo-label tokens)
         + w_mse · MSE(aligner(h_s), h_t) + w_wave · Σ_j L1(DWT_j(aligner(h_s)), DWT_j(h_t))   (j = 3 'db6' high bands)
         + w_kl · T² · KL(p_t^T ‖ p_s^T) at the answer position

Hidden states are compared position by position: the tokenizers (and the number of bridge queries)
match, so both sequences line up. The aligner is a trainable 1×1 Conv1d from student width to
teacher width that stays on the cloud, one per device.

Which phases run by default is decided by measurement (docs/notebook.md §0). In the label phase
three levers decide whether the teacher's knowledge arrives:
- **gating and weighting** — pseudo-labels below ``min_teacher_confidence`` are not trained on, and
  ``weighting="entropy"`` scales each sample's CE and KL by 1/exp(H_t − E0) (CEMA, ICLR 2024), H_t the
  teacher's entropy over the answer candidates and E0 = 0.4·ln(#candidates);
- **soft targets** — ``targets="soft"`` trains on the teacher's candidate distribution instead of its argmax;
- **source rehearsal** — the cloud owns the labelled source data the device was trained on; mixing
  ``source_replay`` clean source samples per trained record into each step limits forgetting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

from cdcca.adapter_state import AdapterState
from cdcca.akd.prefix import PREFIX_GROUPS, PrefixTeacher, train_prefix
from cdcca.akd.source_set import SourceSet
from cdcca.model.mllm import MLLM, adapter_state, answer_loss, is_adapter_key, load_adapter_state
from cdcca.model.prompt import Prompter

TRAIN_GROUPS = {
    "all": lambda name: True,
    "bridge": lambda name: name.startswith("bridge."),
    "lora": lambda name: not name.startswith("bridge."),
}


@dataclass
class AKDConfig:
    """How the cloud distils; the defaults follow the authors' released settings where they fit."""

    epochs: int = 0                       # label phase (paper: 3); off by default: with prefix distillation it
                                          # added +1.5 points but cost 3.5 points of clean accuracy (docs/notebook.md §0)
    batch_size: int = 16
    lr: float = 1e-4                      # paper 3e-5 (7B LLM); 3e-4 here made the device forget clean data (-10 pts)
    lr_final: float = 1.7e-5              # cosine decay target (paper 5e-6: the same 1/6 ratio)
    weight_decay: float = 0.02            # paper
    betas: tuple[float, float] = (0.9, 0.95)   # paper
    grad_clip: float = 2.0                # paper
    w_ce: float = 1.0                     # CE on the teacher's pseudo-labels
    w_mse: float = 0.5                    # hidden-state MSE (on states scaled by the teacher's RMS)
    w_wave: float = 0.5                   # L1 on wavelet high bands
    w_kl: float = 1.0                     # logit KD
    temperature: float = 2.0
    wavelet: str = "db6"
    wave_levels: int = 3
    min_teacher_confidence: float = 0.8   # train only on pseudo-labels the teacher is this sure of (label study: +18
                                          # points over the device on the kept uploads, against +9 ungated)
    weighting: str = "none"               # "none" | "entropy": per-sample 1/exp(H_teacher − E0) on CE and KL (CEMA)
    targets: str = "hard"                 # "hard": CE on the teacher's argmax | "soft": CE on its candidate distribution
    source_replay: float = 1.0            # labelled clean source samples rehearsed per trained record (against forgetting)
    w_source: float = 1.0                 # weight of the source-rehearsal CE
    replay_capacity: int = 512            # bounded replay of earlier uploads (reservoir)
    replay_per_round: float = 1.0         # replayed records per new record
    train: str = "all"                    # which adapters the student updates: all | bridge | lora
    prefix_epochs: int = 15               # prefix distillation (cdcca.akd.prefix) before the label phase; 0 = off
    prefix_lr: float = 1e-3               # a round brings 48 uploads (+ as many replayed): 3e-4 needed 4× the epochs
                                          # to move the bridge as far before the next round (docs/RESULTS.md, recipe)
    prefix_batch: int = 32
    prefix_ridge: float = 100.0           # ridge of the teacher → device prefix map fitted on clean source images
    prefix_params: str = "input"          # bridge parameters prefix distillation moves: input (0.33 M entries, fits
                                          # the 256 KiB downlink) | all (2.4 M: +0.4 dense, but DWC loses 4.5 of it)
    seed: int = 0

    def __post_init__(self):
        for name in ("w_ce", "w_mse", "w_wave", "w_kl", "lr", "lr_final", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"AKDConfig.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.prefix_params not in PREFIX_GROUPS:
            raise ValueError(f"AKDConfig.prefix_params must be one of {', '.join(PREFIX_GROUPS)}; got {self.prefix_params!r}")
        if self.train not in TRAIN_GROUPS:
            raise ValueError(f"AKDConfig.train must be one of {', '.join(TRAIN_GROUPS)}; got {self.train!r}")
        if self.weighting not in ("none", "entropy"):
            raise ValueError(f"AKDConfig.weighting must be 'none' or 'entropy'; got {self.weighting!r}")
        if self.targets not in ("hard", "soft"):
            raise ValueError(f"AKDConfig.targets must be 'hard' or 'soft'; got {self.targets!r}")
        if self.source_replay < 0 or self.w_source < 0:
            raise ValueError("AKDConfig.source_replay and w_source must be ≥ 0")
        if self.epochs < 0 or self.prefix_epochs < 0 or self.batch_size < 1 or self.prefix_batch < 1:
            raise ValueError("AKDConfig.epochs and prefix_epochs must be ≥ 0, batch sizes ≥ 1")
        if self.epochs == 0 and self.prefix_epochs == 0:
            raise ValueError("AKDConfig: epochs and prefix_epochs are both 0, so nothing would be trained")
        self.betas = tuple(self.betas)

    @property
    def needs_source(self) -> bool:
        """Whether the distiller needs the labelled clean source set (rehearsal or prefix anchors)."""
        return self.source_replay > 0 or self.prefix_epochs > 0

    @classmethod
    def ablation(cls, name: str, **kw) -> AKDConfig:
        """Named loss ablations: ce, ce+mse, ce+mse+wave, full (ce+mse+wave+kl)."""
        terms = {"ce": dict(w_mse=0, w_wave=0, w_kl=0), "ce+mse": dict(w_wave=0, w_kl=0),
                 "ce+mse+wave": dict(w_kl=0), "full": {}}
        if name not in terms:
            raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(terms)}")
        return cls(**{**terms[name], **kw})


@dataclass
class TeacherRecord:
    """Everything the student needs about one uploaded sample; the teacher is never run again for it."""

    sample_id: str
    tokens: torch.Tensor        # (P, C) fp16, dropped slots filled as the uplink configured
    keep: torch.Tensor          # (P,) bool
    question: str
    pseudo_label: str
    confidence: float           # teacher's probability of its pseudo-label among the candidates
    hidden: torch.Tensor        # (Q + T_prompt, d_t) fp16, pre-norm last layer, visual + prompt positions
    logits: torch.Tensor        # (V,) fp16 at the answer position
    probs: torch.Tensor | None = None   # (n_candidates,) teacher's distribution over the answer candidates
    prefix: torch.Tensor | None = None  # (Q, d_t) fp16 teacher bridge output on the uploaded tokens

    @property
    def answered(self) -> bool:
        """False for a prefix-only record: the teacher's LLM was not run (nothing needed its answer)."""
        return bool(self.pseudo_label)

    @property
    def entropy(self) -> float:
        """Teacher entropy over the candidates (nats); 0 when the label is known for certain."""
        if self.probs is None:
            return 0.0
        p = self.probs.float().clamp_min(1e-12)
        return float(-(p * p.log()).sum())


def with_true_labels(records: list[TeacherRecord], truth: Sequence[str], candidates: list[str]) -> list[TeacherRecord]:
    """The oracle: the same records with the true answer as the label (confidence 1, one-hot targets).

    Everything else — tokens, keep masks, teacher hidden states and logits — is left as it was, so an
    oracle run differs from a teacher run in the labels alone.
    """
    out = []
    for r, answer in zip(records, truth, strict=True):
        onehot = torch.zeros(len(candidates))
        if answer in candidates:
            onehot[candidates.index(answer)] = 1.0
        out.append(replace(r, pseudo_label=answer, confidence=1.0, probs=onehot))
    return out


def answer_loss_per_sample(model: MLLM, fwd, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE averaged over each sample's own answer tokens: (B,). Its mean over equal-length
    answers is :func:`answer_loss`; per sample, so that samples can be weighted."""
    text = fwd.normed[:, fwd.n_visual:]
    target = labels[:, 1:]
    sel = target != -100                                          # (B, T-1); lm_head only where labelled
    ce = F.cross_entropy(model.logits(text[:, :-1][sel]).float(), target[sel], reduction="none")
    owner = sel.nonzero()[:, 0]
    total = torch.zeros(len(labels), dtype=ce.dtype).index_add(0, owner, ce)
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
    import ptwt

    s = ptwt.wavedec(student.transpose(1, 2).float(), wavelet, level=levels, mode="zero")   # [cA, cD_levels..cD1]
    t = ptwt.wavedec(teacher.transpose(1, 2).float(), wavelet, level=levels, mode="zero")
    return sum(F.l1_loss(a, b) for a, b in zip(s[1:], t[1:]))


class ReplayBuffer:
    """Reservoir sample of earlier teacher records, bounded in size, so old domains are not forgotten."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.items: list[TeacherRecord] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, records: list[TeacherRecord]) -> None:
        for r in records:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(r)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.capacity:
                    self.items[j] = r

    def sample(self, n: int) -> list[TeacherRecord]:
        return self.rng.sample(self.items, min(n, len(self.items)))


@dataclass
class StudentState:
    """Per device, what the cloud carries from round to round besides the adapter mirror."""

    aligner: Aligner
    replay: ReplayBuffer            # gated records, for the label phase
    prefix_replay: ReplayBuffer     # every record, for prefix distillation


@dataclass
class DistillStats:
    samples: int
    replayed: int
    steps: int
    student_s: float
    losses: dict[str, float] = field(default_factory=dict)
    pseudo_label_agreement: float = float("nan")   # share where the device's own answer matched the teacher

    @property
    def samples_per_s(self) -> float:
        """Trained samples per second of student time (the teacher pass is timed by the caller)."""
        return self.samples / max(1e-9, self.student_s)


class AKD:
    """The cloud's distiller: a teacher, one student network, and per-device aligner + replay state."""

    def __init__(self, teacher: MLLM, student: MLLM, prompter: Prompter, cfg: AKDConfig | None = None,
                 source: SourceSet | None = None):
        self.teacher = teacher.eval()
        self.student = student
        self.prompter = prompter
        self.cfg = cfg or AKDConfig()
        if self.cfg.source_replay > 0 and source is None:
            raise ValueError("AKDConfig.source_replay > 0 needs the labelled source set (AKD(..., source=load_source_set()))")
        self.source = source
        self.prefix_teacher: PrefixTeacher | None = None
        if self.cfg.prefix_epochs > 0:
            if source is None:
                raise ValueError("AKDConfig.prefix_epochs > 0 needs the clean source set (AKD(..., source=load_source_set()))")
            # the student holds the source device's adapters now: the map and the anchors are the source model's
            self.prefix_teacher = PrefixTeacher.fit(self.teacher.bridge, student.bridge, source.tokens, self.cfg.prefix_ridge)
        self.teacher_forward_calls = 0
        self.teacher_samples = 0
        self.students: dict[str, StudentState] = {}

    def fresh_student_state(self) -> StudentState:
        """A device's state before its first round: a seeded aligner and empty replay buffers."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            aligner = Aligner(self.student.cfg.bridge.d_lm, self.teacher.cfg.bridge.d_lm)
        return StudentState(aligner, ReplayBuffer(self.cfg.replay_capacity, self.cfg.seed),
                            ReplayBuffer(self.cfg.replay_capacity, self.cfg.seed + 1))

    def student_state(self, device_id: str) -> StudentState:
        """What this cloud keeps for one device between rounds (created on first contact)."""
        if device_id not in self.students:
            self.students[device_id] = self.fresh_student_state()
        return self.students[device_id]

    # -- step 1: the teacher pass, once per uploaded sample ---------------------------------------
    @torch.no_grad()
    def teacher_pass(self, tokens: torch.Tensor, keep: torch.Tensor, questions: list[str],
                     sample_ids: list[str], batch_size: int = 64, answers: bool = True) -> list[TeacherRecord]:
        """The teacher's records of the uploads. ``answers=False``: only its bridge runs (the prefix that
        prefix distillation needs) — no LLM pass, no label, hidden states or logits — for rounds in which
        nothing consumes the teacher's answers."""
        if not answers:
            return self._prefix_records(tokens, keep, questions, sample_ids, batch_size)
        records = []
        cand = self.prompter.candidate_first_ids
        for s in range(0, len(questions), batch_size):
            qs = questions[s:s + batch_size]
            text = self.prompter.batch(qs)
            fwd = self.teacher(tokens[s:s + batch_size], keep[s:s + batch_size], text.input_ids, text.attention_mask)
            self.teacher_forward_calls += 1
            self.teacher_samples += len(qs)
            logits = self.teacher.logits(fwd.normed[:, -1]).float()            # (b, V)
            probs = logits[:, cand].softmax(-1)
            conf, pick = probs.max(-1)
            Q, T = fwd.n_visual, text.input_ids.shape[1]
            for i in range(len(qs)):
                n_text = int(text.attention_mask[i].sum())
                h = torch.cat([fwd.hidden[i, :Q], fwd.hidden[i, Q + T - n_text:]])   # drop padding
                records.append(TeacherRecord(
                    sample_ids[s + i], tokens[s + i].half(), keep[s + i].clone(), qs[i],
                    self.prompter.candidates[int(pick[i])], float(conf[i]), h.half(), logits[i].half(), probs[i].clone(),
                    fwd.visual[i].half()))
        return records

    def _prefix_records(self, tokens: torch.Tensor, keep: torch.Tensor, questions: list[str], sample_ids: list[str],
                        batch_size: int) -> list[TeacherRecord]:
        prefix = torch.cat([self.teacher.bridge(tokens[s:s + batch_size], keep[s:s + batch_size])    # as in its forward
                            for s in range(0, len(questions), batch_size)])
        self.teacher_samples += len(questions)
        d_t = prefix.shape[-1]
        return [TeacherRecord(sid, tokens[i].half(), keep[i].clone(), q, "", 0.0, torch.zeros(0, d_t, dtype=torch.float16),
                              torch.zeros(0, dtype=torch.float16), None, prefix[i].half())
                for i, (sid, q) in enumerate(zip(sample_ids, questions))]

    @property
    def needs_answers(self) -> bool:
        """Whether distillation itself uses the teacher's answers (the label phase); prefix distillation does not."""
        return self.cfg.epochs > 0

    # -- step 2: distil into the device's adapters --------------------------------------------
    def distill(self, device_id: str, base: AdapterState, records: list[TeacherRecord],
                device_answers: list[str] | None = None) -> tuple[AdapterState, DistillStats]:
        """Train a copy of ``base`` (the device's current adapters) on ``records`` + replay; return new adapters."""
        cfg = self.cfg
        t0 = time.perf_counter()
        new = [r for r in records if r.answered and r.confidence >= cfg.min_teacher_confidence]
        state = self.student_state(device_id)
        replay = state.replay
        # dropout draws from a generator seeded by the device's history, so a restarted cloud repeats them
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + replay.seen * 1009 + state.prefix_replay.seen)
            return self._distill(state, base, records, new, device_answers, t0)

    def _distill(self, state: StudentState, base: AdapterState, records: list[TeacherRecord],
                 new: list[TeacherRecord], device_answers: list[str] | None, t0: float) -> tuple[AdapterState, DistillStats]:
        cfg = self.cfg
        replay = state.replay
        old = replay.sample(int(len(new) * cfg.replay_per_round)) if cfg.epochs > 0 else []
        data = new + old
        load_adapter_state(self.student, base)
        rng = random.Random(cfg.seed + replay.seen)
        prefix_stats = self.distill_prefix(state.prefix_replay, records, rng) if self.prefix_teacher and records else {}
        steps, totals = self._train_labels(state.aligner, data, rng) if data else (0, {})
        replay.add(new)
        agree = float("nan")
        if device_answers is not None and records and all(r.answered for r in records):
            agree = sum(a == r.pseudo_label for a, r in zip(device_answers, records)) / len(records)
        losses = {**{k: v / max(1, steps) for k, v in totals.items()}, **prefix_stats}
        stats = DistillStats(len(new) if data else 0, len(old) if data else 0, steps, time.perf_counter() - t0, losses, agree)
        return adapter_state(self.student), stats

    def _train_labels(self, aligner: Aligner, data: list[TeacherRecord], rng: random.Random) -> tuple[int, dict[str, float]]:
        """The label phase: ``cfg.epochs`` over ``data`` with the AKD loss (+ source rehearsal); returns
        the number of steps and the summed loss terms."""
        cfg = self.cfg
        chosen = TRAIN_GROUPS[cfg.train]
        for name, p in self.student.named_parameters():
            p.requires_grad_(is_adapter_key(name) and chosen(name))
        params = [p for p in self.student.parameters() if p.requires_grad] + list(aligner.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil(len(data) / cfg.batch_size)
        totals: dict[str, float] = {}
        step = 0
        self.student.train()
        for _ in range(cfg.epochs):
            order = list(range(len(data)))
            rng.shuffle(order)
            for s in range(0, len(order), cfg.batch_size):
                batch = [data[i] for i in order[s:s + cfg.batch_size]]
                lr = cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * step / max(1, steps - 1)))
                for g in opt.param_groups:
                    g["lr"] = lr
                terms = self.loss_terms(batch, aligner)
                if cfg.source_replay > 0:
                    terms["source"] = self.source_loss(max(1, round(len(batch) * cfg.source_replay)), rng)
                loss = sum(terms.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + v.item()
                step += 1
        self.student.eval()
        for name, p in self.student.named_parameters():
            p.requires_grad_(is_adapter_key(name))
        return step, totals

    def distill_prefix(self, replay: ReplayBuffer, records: list[TeacherRecord], rng: random.Random) -> dict[str, float]:
        """Prefix distillation of the student's bridge on every record (no gate: the target is not a
        label) plus a replay of earlier ones from ``replay``; see :mod:`cdcca.akd.prefix`."""
        cfg = self.cfg
        data = records + replay.sample(int(len(records) * cfg.replay_per_round))
        targets = self.prefix_teacher.map(torch.stack([r.prefix for r in data]))
        stats = train_prefix(self.student.bridge, self.prefix_teacher, torch.stack([r.tokens for r in data]),
                             torch.stack([r.keep for r in data]), targets, epochs=cfg.prefix_epochs,
                             batch_size=cfg.prefix_batch, lr=cfg.prefix_lr, source_ratio=cfg.source_replay,
                             grad_clip=cfg.grad_clip, rng=rng, group=cfg.prefix_params)
        replay.add(records)
        return stats

    def sample_weights(self, batch: list[TeacherRecord]) -> torch.Tensor:
        """Per-sample loss weights (B,): ones, or CEMA's 1/exp(H_teacher − E0) normalised to mean 1."""
        if self.cfg.weighting == "none":
            return torch.ones(len(batch))
        e0 = 0.4 * math.log(len(self.prompter.candidates))
        w = torch.tensor([math.exp(-(r.entropy - e0)) for r in batch])
        return w / w.mean()

    def source_loss(self, n: int, rng: random.Random) -> torch.Tensor:
        """CE on the true answers of ``n`` clean source samples (rehearsal against forgetting)."""
        tokens, questions, answers = self.source.sample(n, rng)
        text = self.prompter.batch(questions, answers)
        fwd = self.student(tokens, None, text.input_ids, text.attention_mask)
        return self.cfg.w_source * answer_loss(self.student, fwd, text.labels)

    def loss_terms(self, batch: list[TeacherRecord], aligner: Aligner) -> dict[str, torch.Tensor]:
        """The switchable AKD terms for one batch (zero-weighted terms are skipped, not computed)."""
        cfg = self.cfg
        text = self.prompter.batch([r.question for r in batch], [r.pseudo_label for r in batch])
        tokens = torch.stack([r.tokens for r in batch]).float()
        keep = torch.stack([r.keep for r in batch])
        fwd = self.student(tokens, keep, text.input_ids, text.attention_mask)
        weights = self.sample_weights(batch)
        B = len(batch)
        terms: dict[str, torch.Tensor] = {}
        if cfg.w_ce:
            if cfg.targets == "soft" and all(r.probs is not None for r in batch):
                s_logits = self.student.logits(fwd.normed[torch.arange(B), fwd.n_visual + text.answer_start]).float()
                log_p = s_logits[:, self.prompter.candidate_first_ids].log_softmax(-1)
                target = torch.stack([r.probs for r in batch]).float()
                per_sample = -(target * log_p).sum(-1)
            else:
                per_sample = answer_loss_per_sample(self.student, fwd, text.labels)
            terms["ce"] = cfg.w_ce * (weights * per_sample).mean()
        if cfg.w_kl:
            s_logits = self.student.logits(fwd.normed[torch.arange(B), fwd.n_visual + text.answer_start]).float()
            t_logits = torch.stack([r.logits for r in batch]).float()
            T = cfg.temperature
            kl = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1),
                          log_target=True, reduction="none").sum(-1)
            terms["kl"] = cfg.w_kl * T * T * (weights * kl).mean()
        if cfg.w_mse or cfg.w_wave:
            h_s, h_t, mask = self._aligned_hidden(fwd, text, batch)
            h_s = aligner(h_s) * mask
            scale = h_t.pow(2).sum() / (mask.sum() * h_t.shape[-1])
            h_s, h_t = h_s / scale.sqrt(), h_t / scale.sqrt()
            if cfg.w_mse:
                terms["mse"] = cfg.w_mse * ((h_s - h_t).pow(2).sum() / (mask.sum() * h_t.shape[-1]))
            if cfg.w_wave:
                terms["wave"] = cfg.w_wave * wavelet_highband_l1(h_s, h_t, cfg.wavelet, cfg.wave_levels)
        return terms

    def _aligned_hidden(self, fwd, text, batch: list[TeacherRecord]):
        """Student and teacher hidden states over visual + prompt positions, left-padded to one length."""
        Q = fwd.n_visual
        lengths = [r.hidden.shape[0] for r in batch]
        L = max(lengths)
        B, d_s = len(batch), fwd.hidden.shape[-1]
        h_s = fwd.hidden.new_zeros(B, L, d_s)
        h_t = torch.zeros(B, L, batch[0].hidden.shape[-1])
        mask = torch.zeros(B, L, 1)
        for i, r in enumerate(batch):
            n_prompt = lengths[i] - Q
            start = int(text.answer_start[i]) - n_prompt + 1          # first prompt token in the text
            pos = torch.cat([torch.arange(Q), Q + torch.arange(start, start + n_prompt)])
            h_s[i, L - lengths[i]:] = fwd.hidden[i, pos]
            h_t[i, L - lengths[i]:] = r.hidden.float()
            mask[i, L - lengths[i]:] = 1
        return h_s, h_t, mask
