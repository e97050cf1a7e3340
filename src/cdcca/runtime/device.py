"""Device runtime: answers requests, keeps uncertain samples in a durable outbox, applies updates.

A device's state dir holds everything it needs to survive a restart or a power cut:

    device.json      device id, model kind, UTS settings, request-stream slice, byte counters
    adapters/        versioned adapter states (:class:`cdcca.runtime.adapter_store.AdapterStore`, atomic, rollback)
    outbox.sqlite    uplink samples not yet acknowledged by the cloud (:class:`cdcca.runtime.outbox.Outbox`)

The runtime imports no fleet code and simulates no traffic: the in-process fleet and the Flower ClientApp
both drive it; a driver that simulates requests feeds them (:mod:`cdcca.fleet.traffic`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from cdcca.atomic import write_json
from cdcca.data.jsonl import IMAGE_SIZE
from cdcca.data.scenario import Scenario, stream_spec
from cdcca.model.answer import Answer, answer_all
from cdcca.model.encoder import encode_images, load_encoder, tiny_encode
from cdcca.model.mllm import MLLM, adapter_state, load_adapter_state
from cdcca.model.pair import role_model, role_prompter
from cdcca.runtime.adapter_store import AdapterStore
from cdcca.runtime.outbox import Outbox
from cdcca.runtime.queue_status import OUTBOX_FILE
from cdcca.runtime.shift import ShiftDetector, ShiftReport
from cdcca.trained_pair import adopt, recorded, run_answers
from cdcca.uplink import (
    UTSConfig,
    build_uplink,
    collect_token_stats,
    default_token_stats,
    plan_uplink,
    sample_uncertainty,
    view_uncertainty,
)
from cdcca.wire import decode, require_plain_name

CONFIG = "device.json"


def check_config(config, path: Path) -> None:
    """A device.json read from disk has the fields and types the runtime relies on, or a one-line
    ValueError naming the file and the field (it may have been edited or damaged by hand)."""
    fix = "restore it or re-create the device state"

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is corrupt ({why}); {fix}")

    if not isinstance(config, dict):
        raise bad("not a JSON object")
    kinds = {"device_id": str, "uts": dict, "stream": dict, "bytes_up": int, "bytes_down": int}
    for key, kind in kinds.items():
        if not isinstance(config.get(key), kind) or (isinstance(config.get(key), bool) and kind is int):
            raise bad(f"field {key!r} missing or not a {kind.__name__}")
    if not config["device_id"].strip():
        raise bad("empty device_id")
    try:
        UTSConfig(**config["uts"])
    except (TypeError, ValueError) as exc:
        raise bad(f"uts: {str(exc).splitlines()[0]}") from None


class RequestBudget:
    """A round's upload budget for requests that arrive a batch at a time (the API, a file): a request is
    uploaded when its uncertainty ranks among the ``budget / round size`` most uncertain of the last
    ``window`` requests — what the round's budget would have picked, decided as each request comes.
    Until ``warmup`` requests have been seen, the UTS threshold rule decides."""

    def __init__(self, cfg: UTSConfig, round_size: int, window: int = 240, warmup: int = 24):
        self.cfg, self.warmup, self.round_size = cfg, warmup, round_size
        self.share = min(1.0, cfg.budget / max(1, round_size)) if cfg.selection == "budget" else None
        self.history: deque[float] = deque(maxlen=window)
        self.boosted = 0              # requests left that upload ``cfg.shift_boost`` times the share (after a shift)

    def boost(self) -> None:
        """A shift was reported: the next round's worth of requests upload a larger share."""
        self.boosted = self.round_size

    def for_round(self, n_requests: int) -> UTSConfig:
        """The settings of a round served at once: the budget, ``shift_boost`` times it right after a shift."""
        if self.boosted <= 0 or self.cfg.selection != "budget":
            return self.cfg
        self.boosted = max(0, self.boosted - n_requests)
        return replace(self.cfg, budget=min(n_requests, round(self.cfg.budget * self.cfg.shift_boost)))

    def uts_for(self, uncertainties: list[float]) -> UTSConfig:
        """The settings that select this batch's uploads (the history includes the batch)."""
        self.history.extend(uncertainties)
        if self.share is None:
            return self.cfg
        share = min(1.0, self.share * self.cfg.shift_boost) if self.boosted > 0 else self.share
        self.boosted = max(0, self.boosted - len(uncertainties))
        if share >= 1.0 or len(self.history) < self.warmup:
            return replace(self.cfg, selection="threshold", threshold=0.0 if share >= 1.0 else self.cfg.threshold)
        cut = float(np.quantile(np.asarray(self.history), 1.0 - share))
        return replace(self.cfg, selection="threshold", threshold=min(max(cut, 0.0), 1.0))


class DeviceRuntime:
    def __init__(self, state_dir: Path, config: dict, model: MLLM | None = None):
        self.dir = Path(state_dir)
        self.config = config
        self.device_id: str = config["device_id"]
        self.uts = UTSConfig(**config["uts"])
        self.store = AdapterStore(self.dir / "adapters")
        self.outbox = Outbox(self.dir / OUTBOX_FILE)
        self._model = model
        self._encoder = None
        self._request_budget: RequestBudget | None = None
        self.shift = self._shift_detector() if self.uts.shift_z > 0 else None
        if model is not None:
            load_adapter_state(model, self.store.current()[1])

    def _shift_detector(self) -> ShiftDetector:
        """Watching the tokens of a real pair, the detector starts from the pair's clean source images (so the
        first shift counts too); tiny models and older statistics without them start from the stream itself."""
        pooled = None
        if self.uts.shift_signal == "tokens" and not self.config.get("tiny"):
            pooled = default_token_stats().pooled
        if pooled is None:
            return ShiftDetector(z=self.uts.shift_z)
        return ShiftDetector.seeded(pooled.numpy(), z=self.uts.shift_z)

    @property
    def model(self) -> MLLM:
        """The device MLLM with the current adapters, built on first use (status and apply need no model)."""
        if self._model is None:
            self._model = role_model("device", self.config.get("tiny", False))
            load_adapter_state(self._model, self.store.current()[1])
        return self._model

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, state_dir, device_id: str, *, tiny: bool = False, uts: UTSConfig | None = None,
               stream: dict | None = None, model: MLLM | None = None) -> DeviceRuntime:
        """Initialise a state dir with the pretrained device adapters as version 0."""
        d = Path(state_dir)
        if (d / CONFIG).exists():
            raise FileExistsError(f"device state already exists at {d}; open it with DeviceRuntime.open")
        require_plain_name("device id", device_id)
        model = model or role_model("device", tiny)
        uts = uts or (UTSConfig(budget=8, token_scorer="energy") if tiny else UTSConfig())   # tiny: no source statistics
        stream = {"tiny": tiny, **stream_spec("default", Scenario()), **(stream or {})}
        stream["device_id"] = device_id
        config = {"device_id": device_id, "tiny": tiny, "weights": recorded(), "uts": asdict(uts), "stream": stream,
                  "bytes_up": 0, "bytes_down": 0, "created": time.time()}
        d.mkdir(parents=True, exist_ok=True)
        AdapterStore.init(d / "adapters", adapter_state(model), version=0, device_id=device_id)
        write_json(d / CONFIG, config)
        return cls(d, config, model)

    @classmethod
    def open(cls, state_dir, model: MLLM | None = None) -> DeviceRuntime:
        d = Path(state_dir)
        try:
            config = json.loads((d / CONFIG).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no device state at {d}; create it with `cdcca device init --state {d}`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{d / CONFIG} is corrupt ({exc}); restore it or re-create the device state") from None
        check_config(config, d / CONFIG)
        adopt(config.get("weights"), d)
        return cls(d, config, model)

    def _save_config(self) -> None:
        write_json(self.dir / CONFIG, self.config)

    # -- serving -----------------------------------------------------------------------------
    def answer(self, tokens: torch.Tensor, questions: list[str], sample_ids: list[str], batch_size: int = 64) -> list[Answer]:
        """Answer one round's requests and queue the round's uncertain ones (UTS) in the outbox."""
        return self.answer_and_queue(tokens, questions, sample_ids, batch_size)[0]

    def answer_and_queue(self, tokens: torch.Tensor, questions: list[str], sample_ids: list[str], batch_size: int = 64,
                         per_request: bool = False) -> tuple[list[Answer], set[str]]:
        """:meth:`answer`, also saying which requests were queued for upload. ``per_request``: the requests
        come a batch at a time, not as a round, so the round's budget is spread over them (:class:`RequestBudget`)."""
        answers = answer_all(self.model, self._prompter(), tokens, questions, batch_size, self.uts.temperature)
        uts, uncertainty = self.uts, None
        if self.uts.sample_scorer == "view_consistency":       # the second view needs the device model
            # the tiny device's random token width has no clean-source statistics: the batch's own stand in
            stats = collect_token_stats(tokens) if self.config.get("tiny") else None
            uncertainty = view_uncertainty(self.model, self._prompter(), tokens, questions, answers, stats=stats,
                                           keep_ratio=self.uts.keep_ratio, floor=self.uts.ood_floor)
        elif per_request or (self.shift is not None and self.uts.shift_signal == "uncertainty"):
            uncertainty = sample_uncertainty(answers, self.uts.sample_scorer)
        signal = tokens.float().mean(1).cpu().numpy() if self.uts.shift_signal == "tokens" else uncertainty
        if self.shift is not None and (report := self.shift.observe(signal)) is not None:
            self.outbox.report_shift(report.at, report.z)      # in the queue status the cloud polls, until an uplink
            self.request_budget.boost()
        if per_request:
            uts = self.request_budget.uts_for(uncertainty)
        elif self._request_budget is not None:          # a round at once: boosted right after a reported shift
            uts = self._request_budget.for_round(len(questions))
        samples = plan_uplink(tokens, questions, answers, sample_ids, uts, bridge=self.model.bridge, uncertainty=uncertainty)
        self.outbox.add_many(samples)
        return answers, {s.sample_id for s in samples}

    def answer_images(self, images: np.ndarray, questions: list[str], sample_ids: list[str]) -> tuple[list[Answer], set[str]]:
        """Requests as they arrive (the API, ``device serve --requests``): uint8 images → tokens → answers →
        UTS → outbox, with the round's budget spread over requests."""
        return self.answer_and_queue(self.encode(images), questions, sample_ids, per_request=True)

    def serve(self, images: np.ndarray, questions: list[str], source: str = "api") -> list[dict]:
        """:meth:`answer_images` for requests from outside, each given a fresh sample id; one record per
        request: the answer, its confidence, whether it was queued for upload, the adapter version."""
        ids = [f"{source}-{uuid.uuid4().hex[:16]}" for _ in questions]
        answers, queued = self.answer_images(images, questions, ids)
        return [{"answer": a.mc, "direct_answer": a.text, "confidence": max(a.mc_probs), "sample_id": i,
                 "queued_for_upload": i in queued, "adapter_version": self.store.version} for a, i in zip(answers, ids)]

    def warm_up(self) -> None:
        """Load and run the encoder, the model and the tokenizer once on a blank frame (nothing is queued),
        so a server's first request does not pay for them."""

        tokens = self.encode(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
        answer_all(self.model, self._prompter(), tokens, ["what shape is in the image?"], 1, self.uts.temperature)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """Visual tokens of uint8 images (N, H, W, 3): the shared frozen encoder (loaded on first use), or the
        tiny device's fixed projection."""

        if self.config.get("tiny"):
            return tiny_encode(images, self.model.cfg.bridge.token_dim).float()
        if self._encoder is None:
            self._encoder = load_encoder()
        return encode_images(self._encoder, images).float()

    @property
    def request_budget(self) -> RequestBudget:
        if self._request_budget is None:
            self._request_budget = RequestBudget(self.uts, Scenario.from_spec(self.config["stream"]).size)
        return self._request_budget

    def follow_store(self) -> bool:
        """Load the current adapter version if another process applied or rolled back one; True if it did."""
        if not self.store.changed_on_disk():
            return False
        self.store = AdapterStore(self.dir / "adapters")
        if self._model is not None:
            load_adapter_state(self._model, self.store.current()[1])
        return True

    def _prompter(self):
        if getattr(self, "_prompter_obj", None) is None:

            stream = self.config["stream"]
            answers = run_answers(stream.get("stream", "default"), bool(stream.get("tiny")))
            self._prompter_obj = role_prompter("device", answers)
        return self._prompter_obj

    # -- uplink ------------------------------------------------------------------------------
    def collect_uplink(self, max_samples: int = 256, newest: bool = False) -> bytes | None:
        """An uplink packet of pending outbox samples (marked in flight until acknowledged): the oldest, or with
        ``newest`` the most recent (a round reacting to a shift learns the new domain, not the backlog)."""
        samples = self.outbox.pending(max_samples, newest=newest)
        if not samples:
            return None
        packet = build_uplink(samples, self.uts, device_id=self.device_id, adapter_version=str(self.store.version))
        self.outbox.mark_sent([s.sample_id for s in samples], packet_id=uuid.uuid4().hex)
        self.config["bytes_up"] += len(packet)
        self._save_config()
        return packet

    def ack_uplink(self, sample_ids: list[str]) -> int:
        return self.outbox.ack(sample_ids)

    # -- downlink ----------------------------------------------------------------------------
    def apply(self, packet: bytes) -> dict:
        """Verify and apply an update or resync packet atomically (decoded once); the model follows the store."""
        report = self.store.apply(decode(packet), nbytes=len(packet))
        if self._model is not None:
            load_adapter_state(self._model, self.store.current()[1])
        if report.get("status") != "already_applied":
            self.config["bytes_down"] += len(packet)
            self._save_config()
        return report

    def rollback(self, version: int) -> dict:
        report = self.store.rollback(version)
        if self._model is not None:
            load_adapter_state(self._model, self.store.current()[1])
        return report

    def status(self) -> dict:
        st = self.outbox.stats()
        return {"device_id": self.device_id, "version": self.store.version, "hash": self.store.hash,
                "versions": self.store.versions(), "outbox": st.pending + st.in_flight, "outbox_in_flight": st.in_flight,
                "bytes_up": self.config["bytes_up"], "bytes_down": self.config["bytes_down"],
                **({"shift": {"at": self.shift_pending.at, "z": self.shift_pending.z}} if self.shift_pending else {})}

    @property
    def shift_pending(self) -> ShiftReport | None:
        """The shift this device reported that no uplink has carried samples from yet."""
        row = self.outbox.shift()
        return None if row is None else ShiftReport(*row)

    def close(self) -> None:
        self.outbox.close()
