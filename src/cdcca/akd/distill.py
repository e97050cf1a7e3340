"""AKD: adapter-based knowledge distillation from the cloud teacher into one device's adapters.

Per uploaded sample the teacher runs **once** (:meth:`AKD.teacher_pass`): from the same visual
tokens the device sent, it picks a pseudo-label (its multiple-choice answer) and we cache its
pre-norm last-layer hidden states over the visual + prompt positions, its scores of the answer
candidates, and its bridge's output (the visual prefix). The teacher reads the question with its own
tokenizer; nothing it leaves for the student is in its vocabulary (candidates are strings, scores are
per candidate), so a teacher of another family distils as well (docs/MODELS.md). The student — a model holding *that device's
current* adapters — then learns in up to two phases, each on the new records plus a bounded replay:

1. **prefix distillation** (``cfg.prefix``; :mod:`cdcca.akd.prefix`): the device's bridge learns to
   produce the teacher's robust prefix, translated into the device's prefix space by a map fitted
   on clean source images — every upload, no label, no LLM pass;
2. **the label phase** (``cfg.labels``; the paper's loss, :class:`cdcca.akd.losses.AKDLoss`) on the
   pseudo-labels the teacher is sure of.

Which phases run by default is decided by measurement (docs/notebook.md §0). In the label phase
three levers decide whether the teacher's knowledge arrives:
- **gating and weighting** — pseudo-labels below ``min_teacher_confidence`` are not trained on, and
  ``weighting="entropy"`` scales each sample's CE and KL by 1/exp(H_t − E0) (CEMA, ICLR 2024), H_t the
  teacher's entropy over the answer candidates and E0 = 0.4·ln(#candidates);
- **soft targets** — ``targets="soft"`` trains on the teacher's candidate distribution instead of its argmax;
- **source rehearsal** — the cloud owns the labelled source data the device was trained on; mixing
  ``replay.source`` clean source samples per trained record into each step limits forgetting.

The configuration lives in :mod:`cdcca.akd.config`, the records and replay in :mod:`cdcca.akd.records`,
the loss in :mod:`cdcca.akd.losses`; their names are re-exported here for earlier imports.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import torch

from cdcca.adapter_state import AdapterState
from cdcca.akd.config import TRAIN_GROUPS, AKDConfig
from cdcca.akd.interrupt import StopCheck, check
from cdcca.akd.losses import AKDLoss, Aligner, answer_loss_per_sample, wavelet_highband_l1
from cdcca.akd.prefix import PrefixTeacher, train_prefix
from cdcca.akd.records import ReplayBuffer, TeacherRecord, with_true_labels
from cdcca.akd.source_set import SourceSet
from cdcca.metrics import cosine
from cdcca.model.answer import candidate_probs
from cdcca.model.mllm import MLLM, adapter_state, answer_loss, is_adapter_key, load_adapter_state
from cdcca.model.pair import model_prompter
from cdcca.model.placement import text_to
from cdcca.model.prompt import Prompter

__all__ = ["AKD", "AKDConfig", "Aligner", "DistillStats", "ReplayBuffer", "StudentState", "TeacherRecord",
           "answer_loss_per_sample", "wavelet_highband_l1", "with_true_labels"]



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
                 source: SourceSet | None = None, device: str = "cpu", teacher_prompter: Prompter | None = None):
        # ``prompter``: the student's (the device's tokenizer); ``teacher_prompter``: the teacher's own, over the
        # same candidates (default: ``prompter`` when both roles share an LLM, else one in the teacher's tokenizer).
        # ``device``: where the teacher, the student and their training run (cdcca.model.placement);
        # records, replay buffers and the adapters handed back stay on the CPU
        self.device = torch.device(device)
        self.teacher = teacher.to(self.device).eval()
        self.student = student.to(self.device)
        self.prompter = prompter
        self.shared_tokenizer = teacher.cfg.llm == student.cfg.llm
        self.teacher_prompter = teacher_prompter or (
            prompter if self.shared_tokenizer else model_prompter(teacher, prompter.candidates))
        self.cfg = cfg or AKDConfig()
        if self.cfg.replay.source > 0 and source is None:
            raise ValueError("AKDConfig.source_replay > 0 needs the labelled source set (AKD(..., source=load_source_set(the pair's train split)))")
        self.source = source
        self.prefix_teacher: PrefixTeacher | None = None
        if self.cfg.prefix.epochs > 0:
            if source is None:
                raise ValueError("AKDConfig.prefix_epochs > 0 needs the clean source set (AKD(..., source=load_source_set(the pair's train split)))")
            # the student holds the source device's adapters now: the map and the anchors are the source model's
            self.prefix_teacher = PrefixTeacher.fit(self.teacher.bridge, student.bridge, source.tokens.to(self.device),
                                                    self.cfg.prefix.ridge)
        self.teacher_forward_calls = 0
        self.teacher_samples = 0
        self.students: dict[str, StudentState] = {}

    def fresh_student_state(self) -> StudentState:
        """A device's state before its first round: a seeded aligner and empty replay buffers."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            aligner = Aligner(self.student.cfg.bridge.d_lm, self.teacher.cfg.bridge.d_lm).to(self.device)
        return StudentState(aligner, ReplayBuffer(self.cfg.replay.capacity, self.cfg.seed),
                            ReplayBuffer(self.cfg.replay.capacity, self.cfg.seed + 1))

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
        tp = self.teacher_prompter
        dev = self.device
        for s in range(0, len(questions), batch_size):
            qs = questions[s:s + batch_size]
            text = tp.batch(qs)
            fwd = self.teacher(tokens[s:s + batch_size].to(dev), keep[s:s + batch_size].to(dev),
                               text.input_ids.to(dev), text.attention_mask.to(dev))
            self.teacher_forward_calls += 1
            self.teacher_samples += len(qs)
            if tp.sequence_scoring:     # two candidates share a first token in the teacher's vocabulary: whole answers
                probs = candidate_probs(self.teacher, tp, tokens[s:s + batch_size], qs, keep[s:s + batch_size])
                logits = probs.clamp_min(1e-12).log()                           # (b, n_cand), up to a constant
            else:
                logits = self.teacher.logits(fwd.normed[:, -1]).float().cpu()[:, tp.candidate_first_ids]   # (b, n_cand)
                probs = logits.softmax(-1)
            conf, pick = probs.max(-1)
            Q, T = fwd.n_visual, text.input_ids.shape[1]
            hidden, visual = fwd.hidden.cpu(), fwd.visual.cpu()
            for i in range(len(qs)):
                n_text = int(text.attention_mask[i].sum())
                h = torch.cat([hidden[i, :Q], hidden[i, Q + T - n_text:]])   # drop padding
                records.append(TeacherRecord(
                    sample_ids[s + i], tokens[s + i].half(), keep[s + i].clone(), qs[i],
                    tp.candidates[int(pick[i])], float(conf[i]), h.half(), logits[i].half(), probs[i].clone(),
                    visual[i].half()))
        return records

    def _prefix_records(self, tokens: torch.Tensor, keep: torch.Tensor, questions: list[str], sample_ids: list[str],
                        batch_size: int) -> list[TeacherRecord]:
        dev = self.device
        prefix = torch.cat([self.teacher.bridge(tokens[s:s + batch_size].to(dev), keep[s:s + batch_size].to(dev)).cpu()
                            for s in range(0, len(questions), batch_size)])     # as in its forward
        self.teacher_samples += len(questions)
        d_t = prefix.shape[-1]
        return [TeacherRecord(sid, tokens[i].half(), keep[i].clone(), q, "", 0.0, torch.zeros(0, d_t, dtype=torch.float16),
                              torch.zeros(0, dtype=torch.float16), None, prefix[i].half())
                for i, (sid, q) in enumerate(zip(sample_ids, questions))]

    @property
    def needs_answers(self) -> bool:
        """Whether distillation itself uses the teacher's answers (the label phase); prefix distillation does not."""
        return self.cfg.labels.epochs > 0

    # -- step 2: distil into the device's adapters --------------------------------------------
    def distill(self, device_id: str, base: AdapterState, records: list[TeacherRecord],
                device_answers: list[str] | None = None,
                span: tuple[torch.Tensor, torch.Tensor] | None = None,
                should_stop: StopCheck | None = None) -> tuple[AdapterState, DistillStats]:
        """Train a copy of ``base`` (the device's current adapters) on ``records`` + replay; return new adapters.
        ``span``: where prefix distillation may change the bridge's token projection (uploads that came in
        a code: :func:`~cdcca.akd.prefix.train_prefix`); ``should_stop``: asked before every training step,
        raises :class:`~cdcca.akd.interrupt.RoundInterrupted` (the replay buffers may then hold this round's
        records: the caller restores the student state)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        new = [r for r in records if r.answered and r.confidence >= cfg.labels.min_teacher_confidence]
        state = self.student_state(device_id)
        replay = state.replay
        # dropout draws from a generator seeded by the device's history, so a restarted cloud repeats them
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + replay.seen * 1009 + state.prefix_replay.seen)
            # off the CPU, tensors the losses create land on the device too (on the CPU: nothing changes)
            with contextlib.nullcontext() if self.device.type == "cpu" else self.device:
                return self._distill(state, base, records, new, device_answers, t0, span, should_stop)

    def _distill(self, state: StudentState, base: AdapterState, records: list[TeacherRecord],
                 new: list[TeacherRecord], device_answers: list[str] | None, t0: float,
                 span: tuple[torch.Tensor, torch.Tensor] | None,
                 should_stop: StopCheck | None = None) -> tuple[AdapterState, DistillStats]:
        cfg = self.cfg
        replay = state.replay
        old = replay.sample(int(len(new) * cfg.replay.per_round)) if cfg.labels.epochs > 0 else []
        data = new + old
        load_adapter_state(self.student, base)
        rng = random.Random(cfg.seed + replay.seen)
        prefix_stats = (self.distill_prefix(state.prefix_replay, records, rng, span, should_stop)
                        if self.prefix_teacher and records else {})
        steps, totals = self._train_labels(state.aligner, data, rng, should_stop) if data else (0, {})
        replay.add(new)
        agree = float("nan")
        if device_answers is not None and records and all(r.answered for r in records):
            agree = sum(a == r.pseudo_label for a, r in zip(device_answers, records)) / len(records)
        losses = {**{k: v / max(1, steps) for k, v in totals.items()}, **prefix_stats}
        stats = DistillStats(len(new) if data else 0, len(old) if data else 0, steps, time.perf_counter() - t0, losses, agree)
        return adapter_state(self.student), stats

    def _train_labels(self, aligner: Aligner, data: list[TeacherRecord], rng: random.Random,
                      should_stop: StopCheck | None = None) -> tuple[int, dict[str, float]]:
        """The label phase: ``cfg.labels.epochs`` over ``data`` with the AKD loss (+ source rehearsal);
        returns the number of steps and the summed loss terms."""
        cfg, lab = self.cfg, self.cfg.labels
        chosen = TRAIN_GROUPS[cfg.params.train]
        for name, p in self.student.named_parameters():
            p.requires_grad_(is_adapter_key(name) and chosen(name))
        loss_fn = self._loss(aligner)
        params = [p for p in self.student.parameters() if p.requires_grad] + list(loss_fn.parameters())
        opt = torch.optim.AdamW(params, lr=lab.lr, betas=(lab.beta1, lab.beta2), weight_decay=lab.weight_decay)
        steps = lab.epochs * math.ceil(len(data) / lab.batch_size)
        totals: dict[str, float] = {}
        step = 0
        self.student.train()
        try:
            for _ in range(lab.epochs):
                order = list(range(len(data)))
                rng.shuffle(order)
                for s in range(0, len(order), lab.batch_size):
                    check(should_stop)
                    batch = [data[i] for i in order[s:s + lab.batch_size]]
                    lr = cosine(lab.lr, lab.lr_final, step / max(1, steps - 1))
                    for g in opt.param_groups:
                        g["lr"] = lr
                    terms = self._batch_terms(batch, loss_fn)
                    if cfg.replay.source > 0:
                        terms["source"] = self.source_loss(max(1, round(len(batch) * cfg.replay.source)), rng)
                    loss = sum(terms.values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    for k, v in terms.items():
                        totals[k] = totals.get(k, 0.0) + v.item()
                    step += 1
        finally:          # an interrupted round leaves the student as a finished one does
            self.student.eval()
            for name, p in self.student.named_parameters():
                p.requires_grad_(is_adapter_key(name))
        return step, totals

    def distill_prefix(self, replay: ReplayBuffer, records: list[TeacherRecord], rng: random.Random,
                       span: tuple[torch.Tensor, torch.Tensor] | None = None,
                       should_stop: StopCheck | None = None) -> dict[str, float]:
        """Prefix distillation of the student's bridge on every record (no gate: the target is not a
        label) plus a replay of earlier ones from ``replay``; see :mod:`cdcca.akd.prefix`."""
        cfg = self.cfg
        data = records + replay.sample(int(len(records) * cfg.replay.per_round))
        dev = self.device
        targets = self.prefix_teacher.map(torch.stack([r.prefix for r in data]).to(dev))
        stats = train_prefix(self.student.bridge, self.prefix_teacher, torch.stack([r.tokens for r in data]).to(dev),
                             torch.stack([r.keep for r in data]).to(dev), targets, epochs=cfg.prefix.epochs,
                             batch_size=cfg.prefix.batch_size, lr=cfg.prefix.lr, source_ratio=cfg.replay.source,
                             grad_clip=cfg.grad_clip, rng=rng, group=cfg.params.prefix_params, span=span,
                             should_stop=should_stop)
        replay.add(records)
        return stats

    def source_loss(self, n: int, rng: random.Random) -> torch.Tensor:
        """CE on the true answers of ``n`` clean source samples (rehearsal against forgetting)."""
        tokens, questions, answers = self.source.sample(n, rng)
        text = text_to(self.prompter.batch(questions, answers), self.device)
        fwd = self.student(tokens.to(self.device), None, text.input_ids, text.attention_mask)
        return self.cfg.labels.w_source * answer_loss(self.student, fwd, text.labels)

    def loss_terms(self, batch: list[TeacherRecord], aligner: Aligner) -> dict[str, torch.Tensor]:
        """The label phase's loss terms for one batch, with ``aligner`` for this device."""
        return self._batch_terms(batch, self._loss(aligner))

    def _loss(self, aligner: Aligner) -> AKDLoss:
        """The label phase's loss for this student; the terms that read the student's candidates by their first
        token (soft targets, KL) are refused in one line when two candidates share one."""
        lab = self.cfg.labels
        if lab.w_kl or lab.targets == "soft":
            self.prompter.require_first_tokens("the label phase's soft targets and KL term")
        return AKDLoss(lab, aligner, self.prompter.candidate_first_ids, self.shared_tokenizer)

    def _batch_terms(self, batch: list[TeacherRecord], loss_fn: AKDLoss) -> dict[str, torch.Tensor]:
        """The student's forward pass on a batch of records (their pseudo-labels as answers), then the loss."""
        text = text_to(self.prompter.batch([r.question for r in batch], [r.pseudo_label for r in batch]), self.device)
        tokens = torch.stack([r.tokens for r in batch]).float().to(self.device)
        keep = torch.stack([r.keep for r in batch]).to(self.device)
        return loss_fn(self.student, self.student(tokens, keep, text.input_ids, text.attention_mask), text, batch)
