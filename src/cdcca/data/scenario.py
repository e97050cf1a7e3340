"""Scenarios: how long each shift lasts, and whether it comes back.

A scenario turns a stream's domains into a schedule of rounds. Real shifts last — a fogged camera
stays fogged, a device moved to a dark warehouse stays there, and old conditions come back — so an
update that lands after its domain is over helps nobody. The scenarios:

- ``persistent`` (default): each domain for ``rounds_per_domain`` rounds (4 × 80 requests per device);
- ``recurring``: the domains in order, ``visits`` times (A B C D A B C D, 2 rounds per visit);
- ``gradual``: one corruption whose severity rises 1 → 5, ``rounds_per_domain`` rounds per step;
- ``one-round``: each domain for one round of 320 requests (the old stream, kept for comparison).

Every round is a :class:`Slot`: its domain, which visit of that domain it belongs to, and its step
(0 = the first round after the shift). The step is what the recovery curve is indexed by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdcca.data.easyvqa import VQASet
from cdcca.data.stream import Domain, domain_split, questions_on

# name → (rounds per domain, requests per round per device) when not overridden
SCENARIO_DEFAULTS = {"persistent": (4, 80), "recurring": (2, 80), "gradual": (2, 80), "one-round": (1, 320)}
SCENARIOS = tuple(SCENARIO_DEFAULTS)


@dataclass(frozen=True)
class Slot:
    """One round of a schedule."""

    domain: Domain
    visit: int     # 0 = the first time the stream is in this domain
    step: int      # rounds since the stream entered the domain on this visit (0 = the round right after the shift)


@dataclass(frozen=True)
class Scenario:
    name: str = "persistent"
    rounds_per_domain: int | None = None   # None: the scenario's default (SCENARIO_DEFAULTS)
    round_size: int | None = None          # requests per round per device; None: the scenario's default
    visits: int = 2                        # recurring only: how many times the domain sequence is walked

    def __post_init__(self):
        if self.name not in SCENARIO_DEFAULTS:
            raise ValueError(f"unknown scenario {self.name!r}; choose from {', '.join(SCENARIOS)}")
        for field_name in ("rounds_per_domain", "round_size"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"scenario {field_name} must be a positive integer, got {value!r}")
        if not isinstance(self.visits, int) or self.visits < 1:
            raise ValueError(f"scenario visits must be a positive integer, got {self.visits!r}")
        if self.name == "one-round" and self.rounds_per_domain not in (None, 1):
            raise ValueError("the one-round scenario has one round per domain; use --scenario persistent "
                             f"for {self.rounds_per_domain} rounds per domain")

    @property
    def per_domain(self) -> int:
        """Rounds per domain (per visit, per severity step)."""
        return self.rounds_per_domain or SCENARIO_DEFAULTS[self.name][0]

    @property
    def size(self) -> int:
        """Requests per round per device."""
        return self.round_size or SCENARIO_DEFAULTS[self.name][1]

    def domains(self, domains: list[Domain]) -> list[Domain]:
        """The domains the schedule walks: ``gradual`` expands the first one into severities 1..5."""
        if self.name != "gradual":
            return list(domains)
        first = domains[0]
        if first.path is not None or first.corruption == "clean":
            raise ValueError(f"the gradual scenario raises a corruption's severity; {first} has none — "
                             "start the stream with a built-in corruption, e.g. --stream gaussian_blur:5")
        return [Domain(first.corruption, s) for s in range(1, 6)]

    def schedule(self, domains: list[Domain]) -> list[Slot]:
        """Every round's slot, in order."""
        walk = self.domains(domains) * (self.visits if self.name == "recurring" else 1)
        seen: dict[str, int] = {}
        slots = []
        for domain in walk:
            visit = seen.get(str(domain), 0)
            seen[str(domain)] = visit + 1
            slots += [Slot(domain, visit, step) for step in range(self.per_domain)]
        return slots

    def spec(self) -> dict:
        """The scenario as plain values (a device's stream settings, a run's recorded config)."""
        return {"scenario": self.name, "rounds_per_domain": self.per_domain, "round_size": self.size,
                "visits": self.visits}

    @classmethod
    def from_spec(cls, spec: dict) -> Scenario:
        """The scenario of a stream spec; a spec written before scenarios existed (``per_domain``
        requests split over ``rounds_per_domain`` rounds and all devices) reads as ``persistent``."""
        if "scenario" in spec:
            return cls(spec["scenario"], spec.get("rounds_per_domain"), spec.get("round_size"), spec.get("visits", 2))
        rounds = spec.get("rounds_per_domain", 1)
        size = max(1, spec.get("per_domain", 320) // rounds // max(1, spec.get("n_devices", 1)))
        return cls("persistent", rounds, size)


@dataclass
class ScheduledChunk:
    """One round's requests for the whole fleet (device ``i`` of ``n`` serves ``question_ids[i::n]``)."""

    round: int
    slot: Slot
    question_ids: np.ndarray     # indices into the stream's VQASet

    @property
    def domain(self) -> Domain:
        return self.slot.domain


def scenario_chunks(data: VQASet, domains: list[Domain], scenario: Scenario, n_devices: int = 1,
                    seed: int = 0) -> list[ScheduledChunk]:
    """Every round's requests: ``scenario.size × n_devices`` questions on the domain's stream images.

    Each domain draws from its own seeded permutation of its stream questions, round after round and
    visit after visit, so no request repeats until the domain's pool is used up (then a new
    permutation starts). The held-out images are never streamed (:func:`cdcca.data.stream.domain_split`)."""
    slots = scenario.schedule(domains)
    rng = np.random.default_rng(seed + 2)
    pools: dict[str, list] = {}
    chunks = []
    need = scenario.size * n_devices
    for rnd, slot in enumerate(slots):
        key = str(slot.domain)
        if key not in pools:
            pools[key] = [questions_on(data, domain_split(data, slot.domain)[0]), np.empty(0, dtype=np.int64)]
        pool, queue = pools[key]
        while len(queue) < min(need, len(pool)):
            queue = np.concatenate([queue, rng.permutation(pool)])
        take, pools[key][1] = queue[:need], queue[need:]
        chunks.append(ScheduledChunk(rnd, slot, take))
    return chunks


def stream_spec(stream: str, scenario: Scenario, seed: int = 0, index: int = 0, n_devices: int = 1) -> dict:
    """A device's request-stream settings (stored in its state dir): which stream, which scenario,
    which slice of each round's requests."""
    return {"stream": stream, **scenario.spec(), "seed": seed, "index": index, "n_devices": n_devices}


def recovery_curve(rows: list[dict], key: str = "online_mc") -> list[float]:
    """Mean of ``key`` per step after a shift (1st, 2nd, … round of a domain), over every visit of
    every shifted domain; rows carry ``step`` and ``domain`` (clean rounds are left out)."""
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if r.get(key) is not None and r["domain"] != "clean":
            by_step.setdefault(r["step"], []).append(r[key])
    return [float(np.mean(by_step[s])) for s in sorted(by_step)]


AFTER_SHIFT = (20, 40, 80)      # requests after a shift whose online accuracy is reported


def shift_visits(rows: list[dict]) -> list[list[dict]]:
    """One device's rows grouped into the visits of shifted domains, in order (a visit starts at ``step`` 0)."""
    visits: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: r["round"]):
        if r["domain"] == "clean":
            continue
        if r.get("step", 0) == 0 or not visits:
            visits.append([])
        visits[-1].append(r)
    return visits


def after_shift(rows: list[dict], key: str = "correct", reference: str | None = None) -> dict | None:
    """How soon users see the gain, in requests: online accuracy of the first 20 / 40 / 80 answers served after
    each shift (``key``: each row's per-request correctness, in the order served), mean over shifts; with a
    ``reference`` (the never-updated device's correctness on the same requests) also :func:`requests_to_half`.
    None when the rows carry no per-request record."""
    visits = [v for v in shift_visits(rows) if all(key in r for r in v)]
    served = [[bool(c) for r in v for c in r[key]] for v in visits]
    served = [s for s in served if s]
    if not served:
        return None
    out: dict = {f"first_{n}": float(np.mean([np.mean(s[:n]) for s in served])) for n in AFTER_SHIFT}
    if reference is not None:
        out["requests_to_half"] = requests_to_half(visits, key, reference)
    return out


def requests_to_half(visits: list[list[dict]], key: str, reference: str) -> float | None:
    """Requests served after a shift before a round first gains at least half of what the visit's last round
    gains over the reference (counted in whole rounds: an update lands between rounds); mean over the visits
    whose last round gains at all (None: none does)."""
    counts = []
    for visit in visits:
        gains = [float(np.mean(r[key]) - np.mean(r[reference])) for r in visit if r[key] and r.get(reference)]
        if len(gains) != len(visit) or gains[-1] <= 0:
            continue
        n = 0
        for r, gain in zip(visit, gains):
            if gain >= gains[-1] / 2:
                break
            n += len(r[key])
        counts.append(n)
    return float(np.mean(counts)) if counts else None


def revisit_first_rounds(rows: list[dict], key: str = "online_mc") -> float | None:
    """Mean of ``key`` over the first round of every second-or-later visit (recurring: does the device remember?)."""
    vals = [r[key] for r in rows if r.get("visit", 0) > 0 and r.get("step") == 0 and r.get(key) is not None]
    return float(np.mean(vals)) if vals else None
