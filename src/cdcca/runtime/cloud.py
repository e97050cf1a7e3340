"""Cloud runtime: a durable inbox of uploads, one adapter mirror per device, and rounds of AKD → DWC.

State dir layout (SQLite in WAL mode for what must be transactional, files for tensors):

    cloud.sqlite                 packets (uplinks as received), samples (id → packet, round processed),
                                 devices (mirror version + hash), updates (stored update packets, by path
                                 relative to the state dir: the dir can move), metrics (see runtime/cloud_db.py)
    uplinks/<sha>.pkt            uplink packets exactly as received
    devices/<id>/mirror-vN.safetensors, residual-vN.safetensors, update-vN.pkt
    devices/<id>/records-rR.safetensors, akd-vN.json, aligner-vN.safetensors   (AKD's state: student_store;
                                 records no replay buffer refers to are deleted after each round)
    groups/<name>/...            the same files for a fleet group's shared student (see below)

Fleet groups: devices assigned to a group (same site, same camera) share one student. A round pools
the pending uploads of every member, distils them once into the group's own mirror and builds one
compressed update; each member then receives that update re-addressed to its own versions (its
mirror equals the group's previous one), or a dense resync to the group's mirror when it joined late
or fell behind. Cloud time per round then grows with the data and the number of groups, not devices.

Crash safety: an upload is acknowledged only after its transaction commits; a round writes its
files first (new version numbers, never overwriting) and then commits one transaction that marks
the samples processed and moves the device's mirror to version N. A crash before that commit
leaves the previous version current and the samples unprocessed, so the round simply runs again.
AKD's replay buffers and aligner are versioned with the mirror, so a restarted cloud continues
exactly where it stopped (its next update is bit-identical to an uninterrupted run's).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from cdcca import wire
from cdcca.adapter_state import AdapterState, state_hash
from cdcca.akd.distill import AKD, AKDConfig, DistillStats, TeacherRecord
from cdcca.akd.interrupt import StopCheck, check
from cdcca.akd.source_set import load_source_set, random_source_set
from cdcca.atomic import link_or_copy, transaction, write_safetensors
from cdcca.downlink import DWCConfig, build_resync, build_update, readdress_update
from cdcca.downlink import next_budget as next_budget_rule
from cdcca.model.encoder import encoder_shape
from cdcca.model.mllm import adapter_state
from cdcca.model.pair import model_prompter, role_model
from cdcca.runtime.cloud_db import GroupRegistry, commit_uplink, open_db, remembered_tiny
from cdcca.runtime.student_store import load_student_state, prune_records, save_records, save_student_state
from cdcca.trained_pair import active
from cdcca.uplink import UplinkBatch, decode_uplink, default_token_basis, parse_code
from cdcca.uplink.check import check_uplink
from cdcca.uplink.codec import code_span_factors
from cdcca.uplink.packet import uplink_batch
from cdcca.wire import require_plain_name, write_packet

GROUP_PREFIX = "@"       # a group's student is kept like a device's under the owner id "@<group>"


@dataclass(frozen=True)
class RoundStudy:
    """A benchmark's inputs to one cloud round, passed as an argument of the round (a deployment has none)."""

    relabel: Callable[[list[TeacherRecord]], list[TeacherRecord]] | None = None   # e.g. the oracle's true answers
    teacher_answers: bool = False      # run the teacher's LLM for its answers even when AKD does not use them


@dataclass
class RoundReport:
    """What the last :meth:`CloudRuntime.run_round` saw and did, for benchmarks and logs."""

    sample_ids: list[str]
    records: list[TeacherRecord]     # the teacher's records (its labels, before any label override)
    device_answers: list[str]        # the device's own MC answers to the same samples
    stats: DistillStats
    teacher_s: float


class CloudRuntime:
    """The cloud's state dir and its rounds. The models (``akd``, ``initial_state``) may be given or
    built on first use by ``models``: receiving uploads needs none, so ``cdcca cloud receive`` loads none."""

    def __init__(self, state_dir, akd: AKD | None, initial_state: AdapterState | None, dwc: DWCConfig | None = None,
                 downlink: str = "dwc", *, models: Callable[[], tuple[AKD, AdapterState]] | None = None):
        if downlink not in ("dwc", "dense"):
            raise ValueError(f"downlink must be 'dwc' (compressed updates) or 'dense' (full fp32 state); got {downlink!r}")
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._akd, self._initial_state, self._models = akd, initial_state, models
        self.dwc = dwc or DWCConfig()
        self.downlink = downlink
        self.last_round: RoundReport | None = None
        self._student_versions: dict[str, int] = {}   # device → mirror version AKD's in-memory state belongs to
        self.last_round_s = 0.0                          # wall time of the last run_round (teacher + student + DWC)
        self.db = open_db(self.dir)
        self.groups = GroupRegistry(self.db)
        self._decoded: dict[str, UplinkBatch] = {}       # packet sha → its batch, decoded at receive, used by a round
        self.token_shape: tuple[int, int] | None = None  # (P, C) the served encoder makes; None: any (tiny models)

    @property
    def akd(self) -> AKD:
        """The teacher, the students and the distillation (built on first use)."""
        self.load_models()
        return self._akd

    @property
    def initial_state(self) -> AdapterState:
        """The shipped pretrained adapters every new device and group starts from (version 0)."""
        self.load_models()
        return self._initial_state

    def load_models(self) -> None:
        """Load the teacher and the student network now (otherwise the first round that needs them does): a server
        whose first round reacts to a shift should not spend it loading."""
        if self._models is not None:
            self._akd, self._initial_state = self._models()
            self._models = None

    @classmethod
    def open(cls, state_dir, *, tiny: bool | None = None, akd: AKDConfig | None = None,
             dwc: DWCConfig | None = None, candidates: list[str] | None = None,
             torch_device: str = "cpu") -> CloudRuntime:
        """Open (or create) a cloud state dir with the teacher and a student network loaded;
        ``candidates``: the devices' multiple-choice set when their stream has file domains;
        ``torch_device``: where the teacher and the student compute (the state dir is the same).

        ``tiny`` (random tiny models) is recorded in ``cloud.json`` when the state is created and
        read back afterwards; asking for the other kind of model on an existing state is an error."""
        tiny = remembered_tiny(Path(state_dir), tiny)
        cloud = cls(state_dir, None, None, dwc, models=lambda: _build_models(tiny, akd or AKDConfig(), candidates, torch_device))
        if not tiny:
            shape = encoder_shape()
            cloud.token_shape = (shape.n_tokens, shape.token_dim)
        return cloud

    # -- devices, groups and their mirrors -----------------------------------------------------
    def _home(self, owner: str) -> Path:
        """Files of a device (``devices/<id>``) or of a group's shared student (``groups/<name>``)."""
        if owner.startswith(GROUP_PREFIX):
            return self.dir / "groups" / require_plain_name("group name", owner[len(GROUP_PREFIX):])
        return self.dir / "devices" / require_plain_name("device id", owner)

    def set_group(self, device_id: str, group: str | None) -> None:
        """Put a device in a fleet group (its next rounds train the group's shared student), or take
        it out with ``None`` (back to its own student, starting from its current mirror)."""
        self.groups.set(device_id, group)

    def group_of(self, device_id: str) -> str | None:
        return self.groups.group_of(device_id)

    def members(self, group: str) -> list[str]:
        return self.groups.members(group)

    def _device(self, device_id: str) -> tuple[int, str]:
        row = self.db.execute("SELECT version, hash FROM devices WHERE device_id=?", (device_id,)).fetchone()
        if row is None:   # a new device (or group) starts from the shipped pretrained adapters (its version 0)
            d = self._home(device_id)
            d.mkdir(parents=True, exist_ok=True)
            write_safetensors(d / "mirror-v0.safetensors", self.initial_state)
            h = state_hash(self.initial_state)
            self.db.execute("INSERT OR IGNORE INTO devices(device_id, version, hash) VALUES (?,?,?)", (device_id, 0, h))
            return 0, h
        return row[0], row[1]

    def mirror(self, device_id: str) -> tuple[int, AdapterState]:
        version, h = self._device(device_id)
        state = load_file(str(self._home(device_id) / f"mirror-v{version}.safetensors"))
        if state_hash(state) != h:
            raise RuntimeError(f"mirror of {device_id} v{version} does not match its recorded hash; "
                               f"the cloud state dir {self.dir} is damaged — restore it from backup")
        return version, state

    def mirror_hash(self, device_id: str) -> str:
        return self._device(device_id)[1]

    def _residual(self, device_id: str, version: int) -> AdapterState | None:
        path = self._home(device_id) / f"residual-v{version}.safetensors"
        return load_file(str(path)) if path.is_file() else None

    # -- uplink ------------------------------------------------------------------------------
    def receive(self, uplink: bytes) -> list[str]:
        """Commit an uplink packet's samples to the inbox; returns the ids now safe to drop on the device.
        The commit is :func:`~cdcca.runtime.cloud_db.commit_uplink`'s, the one ``cdcca cloud receive`` runs."""
        checked = check_uplink(uplink, basis=default_token_basis(), grid=self.token_shape)   # everything, before storing
        batch = uplink_batch(checked)         # built before storing too: a packet it cannot build is never stored
        receipt = commit_uplink(self.db, self.dir, uplink, checked)
        if receipt.new > 0:   # kept for this process's next round (a restarted cloud decodes the stored packet instead)
            self._decoded[receipt.sha] = batch
        return receipt.sample_ids

    def pending_samples(self, *device_ids: str) -> int:
        marks = ",".join("?" * len(device_ids))
        return self.db.execute(f"SELECT COUNT(*) FROM samples WHERE device_id IN ({marks}) AND round IS NULL",
                               device_ids).fetchone()[0]

    def _load_pending(self, device_ids: list[str], only: Collection[str] | None = None):
        """The untrained uploads of ``device_ids`` (of them, those in ``only`` when given), decoded."""
        marks = ",".join("?" * len(device_ids))
        rows = self.db.execute(f"SELECT sample_id, packet_sha FROM samples WHERE device_id IN ({marks}) AND round IS NULL "
                               "ORDER BY rowid", device_ids).fetchall()
        wanted: dict[str, set[str]] = {}
        for sid, sha in rows:
            if only is None or sid in only:
                wanted.setdefault(sha, set()).add(sid)
        tokens, keep, questions, ids, device_answers, codes = [], [], [], [], [], Counter()
        for sha, sids in wanted.items():
            up = self._decoded.pop(sha, None) or decode_uplink((self.dir / "uplinks" / f"{sha}.pkt").read_bytes())
            for i, sid in enumerate(up.sample_ids):
                if sid in sids:
                    sids.discard(sid)      # a sample id repeated inside one packet is used once
                    tokens.append(up.tokens[i])
                    keep.append(up.keep[i])
                    questions.append(up.questions[i])
                    ids.append(sid)
                    device_answers.append(up.mc[i])
                    codes[up.code] += 1
        if not ids:
            return None
        return torch.stack(tokens), torch.stack(keep), questions, ids, device_answers, codes.most_common(1)[0][0]

    # -- a round: AKD → DWC ------------------------------------------------------------------
    def run_round(self, device_id: str, study: RoundStudy | None = None, only: Collection[str] | None = None,
                  should_stop: StopCheck | None = None) -> bytes | None:
        """Distil the device's new uploads into its mirror and store (then return) the update packet.
        A group member's round trains the group's student on every member's pending uploads (once:
        the next member finds nothing pending) and then delivers the group's update to this device.
        ``study``: a benchmark's inputs to this round (never set in a deployment); ``only``: train on these
        of the pending uploads, the others wait (a round that reacts to a shift); ``should_stop``: asked
        before every training step; when it says so the round raises
        :class:`~cdcca.akd.interrupt.RoundInterrupted` and commits nothing."""
        t_round = time.perf_counter()
        self.last_round = None
        group = self.group_of(device_id)
        if group is None:
            packet = self._train_round(device_id, [device_id], study, only, should_stop)
        else:
            self._train_round(GROUP_PREFIX + group, self.members(group), study, only, should_stop)
            packet = self._deliver(device_id, GROUP_PREFIX + group)
        self.last_round_s = time.perf_counter() - t_round
        return packet

    def _train_round(self, owner: str, sources: list[str], study: RoundStudy | None = None,
                     only: Collection[str] | None = None, should_stop: StopCheck | None = None) -> bytes | None:
        """AKD → DWC for ``owner`` (a device, or a group's student) on the pending uploads of ``sources``."""
        pending = self._load_pending(sources, only)
        if pending is None:
            return None
        tokens, keep, questions, ids, device_answers, code = pending
        version, base = self.mirror(owner)
        rnd = self.db.execute("SELECT rounds FROM devices WHERE device_id=?", (owner,)).fetchone()[0] + 1
        d = self._home(owner)
        self._restore_student(owner, version)      # from here until the commit, an interruption leaves no trace
        check(should_stop)
        t0 = time.perf_counter()
        study = study or RoundStudy()
        answers = self.akd.needs_answers or study.teacher_answers or study.relabel is not None
        teacher_records = self.akd.teacher_pass(tokens, keep, questions, ids, answers=answers)
        teacher_s = time.perf_counter() - t0
        records = study.relabel(teacher_records) if study.relabel else teacher_records
        target, st = self.akd.distill(owner, base, records, device_answers, span=code_span(base, code),
                                      should_stop=should_stop)
        self.last_round = RoundReport(ids, teacher_records, device_answers, st, teacher_s)
        save_records(d / f"records-r{rnd}.safetensors", records)
        new = version + 1
        save_student_state(d, new, self.akd.student_state(owner))
        metrics = {"round": rnd, "uploads": len(ids), "samples": st.samples, "replayed": st.replayed, "steps": st.steps,
                   "teacher_s": round(teacher_s, 3), "student_s": round(st.student_s, 3), "losses": st.losses}
        packet, mirror, next_budget = self._downlink(owner, base, target, version, rnd, metrics)
        write_safetensors(d / f"mirror-v{new}.safetensors", mirror)
        write_packet(d / f"update-v{new}.pkt", packet)
        self._commit_version(owner, version, new, state_hash(mirror), rnd, d / f"update-v{new}.pkt", len(packet),
                             metrics, samples=[(rnd, sid) for sid in ids], budget=next_budget)
        self._student_versions[owner] = new
        prune_records(d, new)
        return packet

    def _commit_version(self, owner: str, version: int, new: int, new_hash: str, rnd: int, packet_path: Path,
                        nbytes: int, metrics: dict, samples: list[tuple[int, str]] = (), budget: int | None = None) -> None:
        """One transaction: the samples processed, the owner's mirror at ``new``, the stored update, the metrics."""
        with transaction(self.db) as db:
            db.executemany("UPDATE samples SET round=? WHERE sample_id=?", samples)
            db.execute("UPDATE devices SET version=?, hash=?, rounds=?, budget=COALESCE(?, budget) WHERE device_id=?",
                       (new, new_hash, rnd, budget, owner))
            db.execute("INSERT OR REPLACE INTO updates VALUES (?,?,?,?,?)",
                       (owner, version, new, packet_path.relative_to(self.dir).as_posix(), nbytes))
            db.execute("INSERT OR REPLACE INTO metrics VALUES (?,?,?)", (owner, rnd, json.dumps(metrics)))

    def _deliver(self, device_id: str, owner: str) -> bytes | None:
        """Bring a group member to its group's mirror: the group's last update re-addressed to the
        device's versions when the device sits at that update's base, a dense resync otherwise."""
        group_version, group_hash = self._device(owner)
        version, device_hash = self._device(device_id)
        if device_hash == group_hash:
            return None
        row = self.db.execute("SELECT path FROM updates WHERE device_id=? AND new_version=?", (owner, group_version)).fetchone()
        last = wire.decode(self._stored(row[0]).read_bytes(), expect_kind="update") if row else None
        new = version + 1
        if last is not None and last.meta.get("base_hash") == device_hash:
            packet, kind = readdress_update(last, device_id=device_id, base_version=version, new_version=new), "update"
        else:
            packet, kind = build_resync(self.mirror(owner)[1], device_id=device_id, version=new), "resync"
        d = self._home(device_id)
        link_or_copy(self._home(owner) / f"mirror-v{group_version}.safetensors", d / f"mirror-v{new}.safetensors")
        write_packet(d / f"update-v{new}.pkt", packet)
        rnd = self.db.execute("SELECT rounds FROM devices WHERE device_id=?", (device_id,)).fetchone()[0] + 1
        metrics = {"round": rnd, "group": owner[len(GROUP_PREFIX):], "group_version": group_version,
                   "delivered": kind, "bytes_down": len(packet)}
        self._commit_version(device_id, version, new, group_hash, rnd, d / f"update-v{new}.pkt", len(packet), metrics)
        return packet

    def _restore_student(self, device_id: str, version: int) -> None:
        """Make AKD's state for the device the one saved with mirror ``version`` (unless it already is),
        and mark it stale until this round commits: a failed round must not leave it half-advanced."""
        if self._student_versions.pop(device_id, None) == version:
            return
        fresh = self.akd.fresh_student_state()
        saved = load_student_state(self._home(device_id), version, self.akd.cfg, fresh.aligner)
        self.akd.students[device_id] = saved or fresh

    def _downlink(self, device_id: str, base: AdapterState, target: AdapterState, version: int, rnd: int,
                  metrics: dict) -> tuple[bytes, AdapterState, int | None]:
        """The packet that moves the device from ``base`` to (about) ``target``, the mirror it leads to,
        and the next DWC budget when the adaptive rule is on. Writes the new residual."""
        new = version + 1
        if self.downlink == "dense":
            packet = build_resync(target, device_id=device_id, version=new)
            metrics["bytes_down"] = len(packet)
            return packet, {k: v.float() for k, v in target.items()}, None
        budget = self.db.execute("SELECT budget FROM devices WHERE device_id=?", (device_id,)).fetchone()[0]
        dwc = self.dwc if budget is None else _with_budget(self.dwc, budget)
        packet, mirror, residual, ust = build_update(base, target, self._residual(device_id, version), dwc,
                                                     device_id=device_id, base_version=version,
                                                     new_version=new, round=rnd)
        write_safetensors(self._home(device_id) / f"residual-v{new}.safetensors", residual)
        metrics.update(bytes_down=len(packet), dense_fp16_bytes=ust.dense_fp16_bytes, energy_kept=ust.energy_kept)
        next_budget = None
        if self.dwc.adaptive and self.dwc.budget_bytes is not None:
            next_budget = next_budget_rule(dwc, dwc.budget_bytes, ust)
        return packet, mirror, next_budget

    def update_for(self, device_id: str, device_version: int) -> bytes | None:
        """The stored update whose base is ``device_version`` (to re-send after a lost reply)."""
        row = self.db.execute("SELECT path FROM updates WHERE device_id=? AND base_version=?",
                              (device_id, device_version)).fetchone()
        return self._stored(row[0]).read_bytes() if row else None

    def _stored(self, path: str) -> Path:
        """A stored update's file from its ``updates.path``: relative to the state dir today; rows written
        before held the path as the command saw it, whose last three parts (``devices|groups/<id>/update-vN.pkt``)
        are the same — so a moved state dir, or a command run from elsewhere, still finds them."""
        return self.dir.joinpath(*Path(path).parts[-3:])

    def resync(self, device_id: str) -> bytes:
        version, state = self.mirror(device_id)
        return build_resync(state, device_id=device_id, version=version)

    def metrics(self, device_id: str) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute(
            "SELECT json FROM metrics WHERE device_id=? ORDER BY round", (device_id,))]

    def close(self) -> None:
        self.db.close()


def code_span(base: AdapterState, code_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where a round may change the bridge's token projection when the round's uploads (most of them)
    came in a pca code (:func:`~cdcca.uplink.codec.code_span_factors`, at the device's current γ); a
    full code: anywhere (None)."""
    code = parse_code(code_name)
    if not code.k:
        return None
    return code_span_factors(base["bridge.token_norm.weight"].float(), code, default_token_basis())


def _build_models(tiny: bool, akd: AKDConfig, candidates: list[str] | None,
                  torch_device: str = "cpu") -> tuple[AKD, AdapterState]:
    """The teacher, a student network and the prompter behind AKD, and the student's shipped adapters."""
    # the model stack stays unloaded until a round needs it (``cdcca cloud receive`` never does)

    pair = active()
    teacher = role_model("cloud", tiny)
    student = role_model("device", tiny)
    prompter = model_prompter(student, candidates or pair.answers)
    if tiny:   # a random-initialised teacher is never confident: gating would leave nothing to train on
        akd = replace(akd, labels=replace(akd.labels, min_teacher_confidence=0.0))
    source = None
    if akd.needs_source:
        source = random_source_set(student.cfg.bridge.token_dim, prompter.candidates) if tiny else \
            load_source_set(pair.task.split("train"))
    initial = adapter_state(student)
    return AKD(teacher, student, prompter, akd, source=source, device=torch_device), initial


def _with_budget(cfg: DWCConfig, budget: int) -> DWCConfig:
    return replace(cfg, budget_bytes=budget)

