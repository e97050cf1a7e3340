"""The cloud's per-device distillation state on disk, so that a restarted cloud continues exactly.

Besides the adapter mirror and the DWC residual, AKD carries three things from round to round for
each device: its replay buffers (which teacher records they hold, the reservoir counter and random
state) and its aligner. They live next to the mirror in the device's folder:

    records-r<R>.safetensors     the teacher records of round R, written once (tokens, keep mask,
                                 hidden states, logits, candidate distribution, bridge prefix; the
                                 ids, questions, labels and confidences in the metadata)
    akd-v<N>.json                for mirror version N: the ids in each replay buffer, its counter and
                                 its random state
    aligner-v<N>.safetensors     for mirror version N: the aligner's weights

Everything is written before the round's commit under new names, like the mirror, so a crash leaves
version N−1 whole. Once a round commits, the records files its replay buffers no longer refer to are
deleted (:func:`prune_records`): a restore reads the current version's buffers only. Loading rebuilds the records bit for bit (they are kept in the precision they
have in memory), which is what makes a restarted cloud's next update identical to an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from cdcca.akd.distill import AKDConfig, Aligner, ReplayBuffer, StudentState, TeacherRecord
from cdcca.atomic import write_json, write_safetensors

FORMAT = "2"   # 2: teacher logits over the answer candidates, not the vocabulary


def save_records(path: Path, records: list[TeacherRecord]) -> None:
    """One round's teacher records as one safetensors file (variable-length hidden states padded)."""
    if not records:
        return
    lengths = [r.hidden.shape[0] for r in records]
    hidden = torch.zeros(len(records), max(lengths), records[0].hidden.shape[-1], dtype=records[0].hidden.dtype)
    for i, r in enumerate(records):
        hidden[i, :lengths[i]] = r.hidden
    tensors = {"tokens": torch.stack([r.tokens for r in records]), "keep": torch.stack([r.keep for r in records]),
               "hidden": hidden, "hidden_len": torch.tensor(lengths, dtype=torch.int32),
               "logits": torch.stack([r.logits for r in records])}
    for name in ("probs", "prefix"):
        if all(getattr(r, name) is not None for r in records):
            tensors[name] = torch.stack([getattr(r, name) for r in records])
    meta = [{"id": r.sample_id, "q": r.question, "label": r.pseudo_label, "conf": r.confidence} for r in records]
    write_safetensors(path, tensors, metadata={"format": FORMAT, "records": json.dumps(meta)})


def load_records(path: Path) -> dict[str, TeacherRecord]:
    """The records of one file by sample id."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["records"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for i, m in enumerate(meta):
        out[m["id"]] = TeacherRecord(
            m["id"], t["tokens"][i], t["keep"][i], m["q"], m["label"], m["conf"],
            t["hidden"][i, :int(t["hidden_len"][i])], t["logits"][i],
            t["probs"][i] if "probs" in t else None, t["prefix"][i] if "prefix" in t else None)
    return out


def _buffer_state(buf: ReplayBuffer) -> dict:
    version, internal, gauss = buf.rng.getstate()
    return {"ids": [r.sample_id for r in buf.items], "seen": buf.seen, "rng": [version, list(internal), gauss]}


def _restore_buffer(state: dict, capacity: int, records: dict[str, TeacherRecord]) -> ReplayBuffer:
    buf = ReplayBuffer(capacity)
    missing = [i for i in state["ids"] if i not in records]
    if missing:
        raise RuntimeError(f"replay records {missing[:3]} are missing from the cloud state dir; restore it from backup")
    buf.items = [records[i] for i in state["ids"]]
    buf.seen = state["seen"]
    version, internal, gauss = state["rng"]
    buf.rng.setstate((version, tuple(internal), gauss))
    return buf


def save_student_state(folder: Path, version: int, state: StudentState) -> None:
    """The buffers and the aligner as of mirror ``version`` (records are saved per round beforehand)."""
    write_safetensors(folder / f"aligner-v{version}.safetensors",
                      {k: v.detach() for k, v in state.aligner.state_dict().items()})
    write_json(folder / f"akd-v{version}.json", {"format": FORMAT, "replay": _buffer_state(state.replay),
                                                  "prefix_replay": _buffer_state(state.prefix_replay)})


def _record_ids(path: Path) -> list[str]:
    """The sample ids a records file holds, from its metadata alone (no tensor is read)."""
    with safe_open(str(path), framework="pt") as f:
        return [m["id"] for m in json.loads(f.metadata()["records"])]


def prune_records(folder: Path, version: int) -> list[Path]:
    """Delete the records files no replay buffer of mirror ``version`` refers to: a restore reads
    only that version's buffers (call it once ``version`` is committed). Returns the deleted files."""
    saved = json.loads((folder / f"akd-v{version}.json").read_text())
    wanted = set(saved["replay"]["ids"]) | set(saved["prefix_replay"]["ids"])
    gone = [f for f in sorted(folder.glob("records-r*.safetensors")) if wanted.isdisjoint(_record_ids(f))]
    for f in gone:
        f.unlink()
    return gone


def load_student_state(folder: Path, version: int, cfg: AKDConfig, aligner: Aligner) -> StudentState | None:
    """The state saved for mirror ``version``, or None when there is none (a device's first round).
    ``aligner`` is a fresh one of the right shape; its weights are overwritten."""
    path = folder / f"akd-v{version}.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("format") != FORMAT:
        raise RuntimeError(f"{path} has format {saved.get('format')!r}, this cloud reads {FORMAT!r}")
    records: dict[str, TeacherRecord] = {}
    for f in sorted(folder.glob("records-r*.safetensors")):
        records.update(load_records(f))
    with safe_open(str(folder / f"aligner-v{version}.safetensors"), framework="pt") as f:
        aligner.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    return StudentState(aligner, _restore_buffer(saved["replay"], cfg.replay.capacity, records),
                        _restore_buffer(saved["prefix_replay"], cfg.replay.capacity, records))
