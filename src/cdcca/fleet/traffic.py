"""Simulated traffic: a device's slice of the continual shift stream, served round by round.

A deployed device answers whatever its API receives; a driver that simulates requests (the demo, the
benchmarks, a ClientApp with ``fleet.traffic="stream"``) owns a :class:`SimulatedTraffic` per device and
feeds the device its next chunk. The device runtime knows nothing of it.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from cdcca.data.scenario import Scenario, ScheduledChunk, scenario_chunks
from cdcca.data.stream import resolve_sequence
from cdcca.runtime.device import DeviceRuntime
from cdcca.runtime.evaluate import domain_tokens
from cdcca.trained_pair import run_stream


class SimulatedTraffic:
    """A device's requests per round, from its stream spec (``device.config["stream"]``): (tokens,
    questions, gold answers, ids, domain). The schedule is built once. ``tiny`` streams use random tokens
    (token width 32) so transport tests need no real features."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.scenario = Scenario.from_spec(spec)

    @classmethod
    def of(cls, device: DeviceRuntime) -> SimulatedTraffic:
        return cls(device.config["stream"])

    @cached_property
    def _data(self):
        return run_stream(self.spec["stream"], bool(self.spec.get("tiny")))

    @cached_property
    def chunks(self) -> list[ScheduledChunk]:
        """Every round of the stream for the whole fleet, as the spec's scenario schedules it."""
        s = self.spec
        return scenario_chunks(self._data, resolve_sequence(s["stream"]), self.scenario, s["n_devices"], s.get("seed", 0))

    def rounds(self) -> int:
        return len(self.scenario.schedule(resolve_sequence(self.spec["stream"])))

    def chunk(self, rnd: int) -> tuple[torch.Tensor, list[str], list[str], list[str], str]:
        """Round ``rnd``'s requests of this device (past the schedule's end, the stream starts again)."""
        s = self.spec
        if s.get("tiny"):
            g = torch.Generator().manual_seed(1000 * s["index"] + rnd)
            n = s.get("per_round", 8)
            qs = ["what color is the shape?", "is there a circle in the image?"] * (n // 2)
            return torch.randn(n, 49, 32, generator=g), qs, ["red", "yes"] * (n // 2), \
                [f"{s['device_id']}-r{rnd}-{i}" for i in range(n)], "tiny"
        chunk = self.chunks[rnd % len(self.chunks)]
        qids = chunk.question_ids[s["index"]::s["n_devices"]]        # each device its own requests
        data = self._data
        tokens = domain_tokens(chunk.domain, data)[data.image_ids[qids]].float()
        return (tokens, [data.questions[i] for i in qids], [data.answers[i] for i in qids],
                [f"{s['device_id']}-r{rnd}-q{i}" for i in qids], str(chunk.domain))

    def serve(self, device: DeviceRuntime, rnd: int) -> dict:
        """Have ``device`` answer its round ``rnd`` (uncertain requests go to its outbox); online metrics."""
        tokens, questions, gold, ids, domain = self.chunk(rnd)
        answers = device.answer(tokens, questions, ids)
        correct = [a.mc == g for a, g in zip(answers, gold)]           # in the order they were served
        return {"round": rnd, "domain": domain, "requests": len(ids), "correct": correct,
                "online_mc": float(np.mean(correct)) if ids else float("nan"), "outbox": device.outbox.size()}


def serve_round(device: DeviceRuntime, rnd: int) -> dict:
    """One round of ``device``'s simulated traffic (a driver serving many rounds keeps a :class:`SimulatedTraffic`)."""
    return SimulatedTraffic.of(device).serve(device, rnd)
