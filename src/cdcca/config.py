"""One run config, read by every driver: :class:`RunConfig`, its sections, presets and the override grammar.

Every knob of a run is declared once, here or in its stage's own section (:class:`~cdcca.uplink.UTSConfig`,
:class:`~cdcca.akd.config.AKDConfig`, :class:`~cdcca.downlink.config.DWCConfig`), with its default and help:

    RunConfig
      model   which pair, each role's LLM, the encoder       data    the domains requests come from
      stream  scenario, round size, visits, update delay      uts / akd / dwc   the three stages
      fleet   devices, group, round triggers, the ServerApp   traffic  bench live's simulated clients
      eval    held-out questions, curves, direct answers      seed, torch_device

One grammar everywhere: dotted keys (``uts.budget``, ``akd.prefix.epochs``) in a TOML file, in
``--set KEY=VALUE`` on every command, and in the Flower run config, which is :func:`flatten` of the same
tree (an unset knob is written there as ``""``). Presets are TOML files of it (``configs/NAME.toml``);
``cdcca config show`` prints a resolved config as a file that runs again. No torch here: a command checks
its config before any model loads.
"""

from __future__ import annotations

import json
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from cdcca.akd.config import AKDConfig
from cdcca.data.scenario import Scenario
from cdcca.downlink.config import DWCConfig
from cdcca.model.spec import RoleModelSection
from cdcca.uplink.config import UTSConfig

CONFIG_DIR = Path(__file__).parent / "configs"
KINDS = {"run": CONFIG_DIR, "bench-paper": CONFIG_DIR / "bench-paper"}
TRAFFIC = ("api", "stream")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ModelSection:
    tiny: bool = field(default=False, metadata=_help(
        "tiny random models (tests, seconds): checks the plumbing, its accuracy means nothing"))
    weights: str | None = field(default=None, metadata=_help(
        "a trained pair's directory (cdcca pretrain --data … --out DIR); unset: the shipped pair, trained on easy-VQA"))
    encoder: str | None = field(default=None, metadata=_help(
        "the vision encoder both roles share: efficientnet-lite0 | efficientnet-lite2 | a local Hugging Face vision "
        "tower (CLIP / SigLIP); unset: the served pair's (pretraining a new pair: efficientnet-lite0)"))
    device: RoleModelSection = field(default_factory=RoleModelSection, metadata=_help(
        "the device's model (docs/MODELS.md); set only to pretrain a pair, elsewhere it must match the served pair"))
    cloud: RoleModelSection = field(default_factory=RoleModelSection, metadata=_help(
        "the cloud teacher's model; the same rules"))


@dataclass
class DataSection:
    domains: str = field(default="default", metadata=_help(
        "the domains requests come from, in order: built-in names, NAME:SEVERITY and your own .jsonl files, comma-separated"))


@dataclass
class StreamSection:
    scenario: str = field(default="persistent", metadata=_help(
        "how long each domain lasts: persistent | recurring | gradual | one-round"))
    rounds_per_domain: int | None = field(default=None, metadata=_help("unset: the scenario's default (persistent: 4)"))
    round_size: int | None = field(default=None, metadata=_help(
        "requests per round per device; unset: the scenario's default (persistent: 80)"))
    visits: int = field(default=2, metadata=_help("recurring: how many times the domains come back"))
    update_delay: int = field(default=0, metadata=_help("rounds an update spends in transit (0: live from the next round)"))

    def __post_init__(self):
        if isinstance(self.update_delay, bool) or not isinstance(self.update_delay, int) or self.update_delay < 0:
            raise ValueError(f"stream.update_delay must be a whole number of rounds ≥ 0; got {self.update_delay!r}")
        self.spec()                              # a bad scenario fails here, before any model loads

    def spec(self) -> Scenario:
        return Scenario(self.scenario, self.rounds_per_domain, self.round_size, self.visits)


@dataclass
class FleetSection:
    devices: int = field(default=1, metadata=_help("devices in the fleet, each with its own slice of every round"))
    group: str | None = field(default=None, metadata=_help(
        "a fleet group every device joins (one shared student per round; the embedded fleet takes 'all'); unset: a student per device"))
    rounds: int = field(default=1, metadata=_help(
        "the ServerApp: rounds to run now (0: until stopped); a run continues after the last round logged"))
    traffic: str = field(default="api", metadata=_help(
        "the ServerApp: api (each device's API fills its outbox) | stream (each device replays its simulated stream)"))
    min_uploads: int = field(default=0, metadata=_help("> 0: a round as soon as the devices' outboxes hold this many samples"))
    early_round: int = field(default=20, metadata=_help(
        "> 0 (with uts.shift_z > 0): a device that reports a shift gets an early round from its newest uploads, at "
        "most this many (simulated drivers serve in pieces of this size; the ServerApp with a time or uploads "
        "trigger starts that round once a device that reported a shift has queued half this many since; older "
        "uploads wait for the next regular "
        "round); 0: the round clock only "
        "(first 80 requests after a shift +1.6 against +4.6 reacting, docs/RESULTS.md)"))
    shift_interrupts: bool = field(default=True, metadata=_help(
        "the ServerApp with a trigger and early_round: a device's shift report stops a regular round's training "
        "(nothing of it is committed; its uploads wait for the next regular round) and starts the shift's round"))
    round_every_s: float = field(default=0.0, metadata=_help(
        "> 0: a round at most this long after the last one began (if anything is queued)"))
    status_every_s: float = field(default=5.0, metadata=_help(
        "how often the outboxes are asked while waiting for a trigger (and, with shift_interrupts, while a regular round trains)"))
    max_samples: int = field(default=256, metadata=_help("uplink samples per packet"))
    cloud_dir: str = field(default="cloud-state", metadata=_help(
        "the ServerApp's cloud state dir (relative: to its working dir)"))
    devices_dir: str = field(default="device-states", metadata=_help("simulated fleets: state dirs of the simulated devices"))
    min_nodes: int = field(default=1, metadata=_help("connected devices to wait for before the first round ..."))
    node_wait_s: float = field(default=120.0, metadata=_help("... for at most this long"))
    reply_timeout_s: float = field(default=1800.0, metadata=_help(
        "one step's replies; replaying a stream round on the real model takes minutes"))
    poll_s: float = field(default=0.2, metadata=_help("between pulls of replies"))

    def __post_init__(self):
        if self.traffic not in TRAFFIC:
            raise ValueError(f"fleet.traffic must be one of {', '.join(TRAFFIC)}; got {self.traffic!r}")
        if self.devices < 1 or min(self.rounds, self.min_uploads, self.early_round) < 0 \
                or min(self.round_every_s, self.status_every_s) < 0:
            raise ValueError("fleet.devices must be ≥ 1; fleet.rounds, min_uploads, early_round, round_every_s and "
                             "status_every_s ≥ 0")

    @property
    def triggered(self) -> bool:
        """Rounds wait for a trigger (time or queued uploads; then also a device's shift report, with
        ``early_round``) instead of following each other."""
        return self.round_every_s > 0 or self.min_uploads > 0


@dataclass
class TrafficSection:
    requests_per_device: int = field(default=640, metadata=_help("bench live: requests each device's clients send"))
    rate: float = field(default=1.0, metadata=_help("bench live: requests per second per device, open loop"))
    concurrency: int = field(default=4, metadata=_help("bench live: requests in flight per device at most"))

    def __post_init__(self):
        if min(self.requests_per_device, self.concurrency) < 1 or self.rate <= 0:
            raise ValueError("traffic.requests_per_device and concurrency must be ≥ 1 and traffic.rate > 0")


@dataclass
class EvalSection:
    heldout_n: int = field(default=200, metadata=_help(
        "held-out questions per domain after the last round: more = tighter numbers, longer run"))
    curve_n: int = field(default=0, metadata=_help(
        "... after each earlier round, for the curves (0: no curves, the last round only)"))
    heldout_da: bool = field(default=False, metadata=_help("also direct-answer accuracy (greedy generation) held out"))
    ablation_seeds: int = field(default=0, metadata=_help(
        "bench paper: the seeds its ablation tables run on, the first N (0: all; Table 1 runs every seed)"))

    def __post_init__(self):
        if self.heldout_n < 1 or self.curve_n < 0 or self.ablation_seeds < 0:
            raise ValueError("eval.heldout_n must be ≥ 1, eval.curve_n and eval.ablation_seeds ≥ 0")


@dataclass
class RunConfig:
    """A whole run: each driver reads the sections it needs."""

    model: ModelSection = field(default_factory=ModelSection, metadata=_help("the model pair"))
    data: DataSection = field(default_factory=DataSection, metadata=_help("where requests come from"))
    stream: StreamSection = field(default_factory=StreamSection, metadata=_help("how long each shift lasts"))
    uts: UTSConfig = field(default_factory=UTSConfig, metadata=_help(
        "the uplink: which requests leave each device per round, and which of their tokens"))
    akd: AKDConfig = field(default_factory=AKDConfig, metadata=_help("the cloud's distillation into each device's adapters"))
    dwc: DWCConfig = field(default_factory=DWCConfig, metadata=_help("the downlink: one compressed adapter update per round"))
    fleet: FleetSection = field(default_factory=FleetSection, metadata=_help("devices, groups and round triggers"))
    traffic: TrafficSection = field(default_factory=TrafficSection, metadata=_help("simulated client traffic"))
    eval: EvalSection = field(default_factory=EvalSection, metadata=_help("what is measured held out"))
    seed: int = field(default=0, metadata=_help("which requests the stream draws, dropout and every random draw of the run"))
    torch_device: str = field(default="cpu", metadata=_help(
        "torch device of the cloud's teacher and student (cpu, cuda, cuda:N); devices stay on the CPU"))

    @property
    def scenario(self) -> Scenario:
        return self.stream.spec()


# ---------------------------------------------------------------------------------------------------
# presets and files

def preset_names(kind: str = "run") -> list[str]:
    """The presets of one kind (``run``: every command's; ``bench-paper``: the paper benchmark's), sorted."""
    return sorted(p.stem for p in _folder(kind).glob("*.toml"))


def preset_path(name: str, kind: str = "run") -> Path:
    path = _folder(kind) / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names(kind))}")
    return path


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a one-line ValueError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no config file at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid TOML config: {e}") from None


def resolve(preset: str | None = None, file: str | Path | None = None, sets: typing.Iterable[str] = (),
            overrides: dict[str, Any] | None = None, kind: str = "run") -> RunConfig:
    """The run config of ``--preset`` or ``--config FILE`` (not both; neither: the defaults), then the
    command's own options (``overrides``, dotted keys) and ``--set KEY=VALUE`` on top, in that order."""
    if preset and file is not None:
        raise ValueError("give --preset NAME or --config FILE, not both")
    cfg = RunConfig()
    if preset or file is not None:
        cfg = apply(cfg, read_toml(file if file is not None else preset_path(preset, kind)))
    cfg = apply(cfg, {k: v for k, v in (overrides or {}).items() if v is not None})
    return apply(cfg, parse_sets(sets))


def parse_sets(sets: typing.Iterable[str]) -> dict[str, Any]:
    """``["uts.budget=32", "akd.prefix.lr=3e-4", 'data.domains="pixelate:5"']`` → dotted keys and values. A
    value is read as TOML (numbers, true/false, quoted strings) and else taken as a plain string; an empty
    value unsets a knob."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. uts.budget=32")
        raw = raw.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"] if raw else ""
        except tomllib.TOMLDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def apply(cfg: Any, settings: dict[str, Any], where: str = "") -> Any:
    """``cfg`` (a config dataclass) with ``settings`` applied: nested tables or dotted keys, each value
    checked against its knob's type. An unknown key is a ValueError naming it and the known ones."""
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        head, dot, rest = key.partition(".")
        if dot:
            nested.setdefault(head, {})
            if not isinstance(nested[head], dict):
                raise ValueError(f"setting {where + head!r} is a knob, not a section")
            nested[head][rest] = value
        elif isinstance(value, dict):
            nested.setdefault(head, {}).update(value)
        else:
            nested[head] = value
    known = {f.name: f for f in fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for name, value in nested.items():
        if name not in known:
            raise ValueError(f"unknown setting {where + name!r}; {where.rstrip('.') or 'the run config'} has {', '.join(sorted(known))}")
        current = getattr(cfg, name)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"setting {where + name!r} is a section; set its knobs, e.g. {where + name}.KEY=VALUE")
            changes[name] = apply(current, value, f"{where}{name}.")
        else:
            changes[name] = _coerce(value, hints[name], where + name)
    return replace(cfg, **changes) if changes else cfg


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type a knob declares; ``""`` or None unsets an optional knob."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        if value in ("", None):
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is typing.Literal:
        hint = str
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
    raise ValueError(f"setting {key!r} must be {want}{' or unset (empty)' if optional else ''}; got {value!r}")


# ---------------------------------------------------------------------------------------------------
# writing it back: TOML that runs again, and the Flower run config's flat form

def knobs(cfg: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any]]:
    """Every knob of ``cfg`` as (dotted key, value, dataclass field), depth first, plain knobs before sections."""
    sections = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            sections.append((f.name, value))
        else:
            yield prefix + f.name, value, f
    for name, value in sections:
        yield from knobs(value, f"{prefix}{name}.")


def to_toml(cfg: Any, header: str = "") -> str:
    """``cfg`` as TOML: each knob after its help text as a comment, one table per section. An unset knob
    is written as a comment: leaving it out leaves it unset."""
    lines = [f"# {line}" for line in header.splitlines()]
    table = ""
    for key, value, f in knobs(cfg):
        section, _, name = key.rpartition(".")
        if section != table:
            lines.extend(["", f"[{section}]"])
            table = section
        lines.extend(textwrap.wrap(f.metadata.get("help", ""), 108, initial_indent="# ", subsequent_indent="# "))
        lines.append(f"# {name} = (unset)" if value is None else f"{name} = {_toml_value(value)}")
    return "\n".join(lines).strip() + "\n"


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """The Flower run config of ``cfg``: every knob under its dotted key, an unset one as ``""``."""
    return {key: "" if value is None else value for key, value, _ in knobs(cfg)}


def flat_toml(cfg: RunConfig) -> str:
    """:func:`flatten` as TOML lines (``fleet.min_uploads = 64``): a file ``flwr run --run-config`` reads."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in flatten(cfg).items())


def from_flat(run_config: dict[str, Any]) -> RunConfig:
    """A run config from its flat form (a Flower run config; keys missing there keep their defaults)."""
    return apply(RunConfig(), dict(run_config))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _folder(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of preset {kind!r}; choose from {', '.join(KINDS)}")
    return KINDS[kind]


__all__ = ["RunConfig", "apply", "flat_toml", "flatten", "from_flat", "knobs", "parse_sets", "preset_names", "read_toml",
           "resolve", "to_toml"]
