"""What a pair is made of: each role's LLM, the decoder layers it keeps, where its LoRA goes and how many
queries its bridge has, and the vision encoder both roles share.

A spec is written into a weights directory's record (``pair.json`` → ``spec``) by ``cdcca pretrain`` and read
back by every process that serves the pair, so a model is always built the way its adapters were trained.
The run config's ``[model.device]`` / ``[model.cloud]`` sections and ``model.encoder`` choose it when a pair is
pretrained; anywhere else a knob that is set must agree with the served pair, or the run is refused in one
line. No torch here: a spec is checked before any model loads.

    LLM       a packaged name (``smollm2-135m``, ``gemma3-270m``) or a local Hugging Face causal-LM directory
    encoder   a packaged name (``efficientnet-lite0``, ``efficientnet-lite2``) or a local Hugging Face
              vision-tower directory (CLIP / SigLIP: its token grid, width and image size come from its config)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

from cdcca.assets import PACKAGED_LLMS as LLM_PACKAGES
from cdcca.assets import AssetError, weights_root

PACKAGED_LLMS = tuple(LLM_PACKAGES)
PACKAGED_ENCODERS = ("efficientnet-lite0", "efficientnet-lite2")
DTYPES = ("fp32", "bf16")
ROLE_DEFAULTS = {"device": {"llm": "smollm2-135m", "layers": "every:3", "lora_targets": "auto", "queries": 16,
                            "dtype": "fp32"},
                 "cloud": {"llm": "smollm2-135m", "layers": "all", "lora_targets": "auto", "queries": 16,
                           "dtype": "fp32"}}
DEFAULT_ENCODER = "efficientnet-lite0"


class SpecError(AssetError):
    """A model spec is malformed, names a model that is not there, or disagrees with the pair it is used with."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class RoleModelSection:
    """One role's knobs in the run config (``[model.device]``, ``[model.cloud]``); unset: the served pair's."""

    llm: str | None = field(default=None, metadata=_help(
        "the role's LLM: smollm2-135m | gemma3-270m | a local Hugging Face causal-LM directory; unset: the served "
        "pair's (pretraining a new pair: smollm2-135m)"))
    layers: str | None = field(default=None, metadata=_help(
        "decoder layers the role keeps: all | every:N (first and last always kept) | a comma list of indices; "
        "unset: the pair's (new pair: device every:3, cloud all)"))
    lora_targets: str | None = field(default=None, metadata=_help(
        "modules that get LoRA: auto (every linear projection inside a decoder layer, found from the "
        "architecture) | a comma list of module names; unset: the pair's (new pair: auto)"))
    queries: int | None = field(default=None, metadata=_help(
        "the bridge's learned queries (LLM positions per image); unset: the pair's (new pair: 16)"))
    dtype: str | None = field(default=None, metadata=_help(
        "the LLM's weights: fp32 | bf16 (the bridge stays fp32; bf16 for an accelerator); unset: the pair's "
        "(new pair: fp32)"))


@dataclass(frozen=True)
class RoleSpec:
    """One role's model, every field resolved."""

    llm: str
    layers: str
    lora_targets: str
    queries: int
    dtype: str

    def __post_init__(self):
        _check_llm(self.llm)
        if self.dtype not in DTYPES:
            raise SpecError(f"model dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.queries < 1:
            raise SpecError(f"model queries must be ≥ 1, got {self.queries}")
        parse_layers(self.layers, None)

    def layer_ids(self, n_layers: int) -> list[int] | None:
        """The decoder layers kept of an LLM with ``n_layers`` (None: all of them)."""
        return parse_layers(self.layers, n_layers)

    def targets(self) -> list[str] | None:
        """LoRA's target module names (None: found from the architecture)."""
        return None if self.lora_targets == "auto" else [t.strip() for t in self.lora_targets.split(",") if t.strip()]


@dataclass(frozen=True)
class PairSpec:
    """The models of a pair: the shared encoder and each role's LLM."""

    encoder: str = DEFAULT_ENCODER
    device: RoleSpec = field(default_factory=lambda: RoleSpec(**ROLE_DEFAULTS["device"]))
    cloud: RoleSpec = field(default_factory=lambda: RoleSpec(**ROLE_DEFAULTS["cloud"]))

    def __post_init__(self):
        _check_encoder(self.encoder)

    def role(self, role: str) -> RoleSpec:
        if role not in ("device", "cloud"):
            raise ValueError(f"role must be 'device' or 'cloud', got {role!r}")
        return self.device if role == "device" else self.cloud

    @property
    def shared_tokenizer(self) -> bool:
        """Both roles read text with one tokenizer (one LLM family): hidden states line up position by position."""
        return self.device.llm == self.cloud.llm

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict | None) -> PairSpec:
        """A spec as :meth:`record` wrote it (None: the shipped pair's, which predates specs)."""
        if record is None:
            return cls()
        try:
            return cls(record["encoder"], RoleSpec(**record["device"]), RoleSpec(**record["cloud"]))
        except (KeyError, TypeError) as exc:
            raise SpecError(f"a pair record's spec is malformed ({exc}); pretrain the pair again") from None

    def describe(self) -> str:
        def role(r: RoleSpec) -> str:
            return f"{_short(r.llm)} ({r.layers} layers, {r.queries} queries{', bf16' if r.dtype == 'bf16' else ''})"
        return f"device {role(self.device)}, cloud {role(self.cloud)}, encoder {_short(self.encoder)}"


def parse_layers(text: str, n_layers: int | None) -> list[int] | None:
    """``all`` → None; ``every:N`` → every N-th layer with the first and the last; ``0,3,6`` → those.
    ``n_layers`` None only checks the grammar."""
    text = text.strip()
    if text == "all":
        return None
    if text.startswith("every:"):
        try:
            step = int(text[len("every:"):])
        except ValueError:
            step = 0
        if step < 1:
            raise SpecError(f"model layers {text!r}: write every:N with N ≥ 1")
        if n_layers is None:
            return None
        ids = list(range(0, n_layers, step))
        if ids[-1] != n_layers - 1:
            ids[-1] = n_layers - 1
        return ids
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise SpecError(f"model layers {text!r}: write all, every:N or a comma list of layer indices") from None
    if ids != sorted(set(ids)) or ids[0] < 0 or (n_layers is not None and ids[-1] >= n_layers):
        raise SpecError(f"model layers {text!r}: indices must be sorted, unique and in 0..{(n_layers or 0) - 1}")
    return ids


def resolve_spec(section, base: PairSpec | None = None) -> PairSpec:
    """``base`` (default: a new pair's defaults) with every knob ``section`` sets (a run config's ``model``)."""
    base = base or PairSpec()
    roles = {}
    for role in ("device", "cloud"):
        given = {f.name: getattr(getattr(section, role), f.name) for f in fields(RoleModelSection)}
        roles[role] = replace(base.role(role), **{k: _local(v) if k == "llm" else v
                                                  for k, v in given.items() if v is not None})
    encoder = _local(section.encoder) if section.encoder is not None else base.encoder
    return PairSpec(encoder, roles["device"], roles["cloud"])


def check_against(section, served: PairSpec, where: str) -> PairSpec:
    """Refuse, in one line, a ``model`` knob that is set and disagrees with the pair being served; returns the
    spec to serve: the pair's, with the dtypes the section asks for (how the weights compute, not what they are:
    an fp32-trained pair serves in bf16 on an accelerator)."""
    wanted = resolve_spec(section, served)
    for key, want, have in _differences(wanted, served):
        if key.endswith(".dtype"):
            continue
        raise SpecError(f"model.{key} = {want!r}, but {where} was trained with {have!r}; drop the setting, or pretrain "
                        f"a pair with it (cdcca pretrain --set model.{key}=… --out W) and pass --weights W")
    return wanted


def _differences(a: PairSpec, b: PairSpec):
    if a.encoder != b.encoder:
        yield "encoder", a.encoder, b.encoder
    for role in ("device", "cloud"):
        for f in fields(RoleSpec):
            if getattr(a.role(role), f.name) != getattr(b.role(role), f.name):
                yield f"{role}.{f.name}", getattr(a.role(role), f.name), getattr(b.role(role), f.name)


def differences(a: PairSpec, b: PairSpec) -> list[str]:
    """The dotted keys on which two specs differ (empty: the same models)."""
    return [key for key, _, _ in _differences(a, b)]


# ---------------------------------------------------------------------------------------------------
# the spec this process builds models from

_override: PairSpec | None = None


def use_spec(spec: PairSpec | None) -> None:
    """Build models from ``spec`` in this process (pretraining a new pair); None: the served pair's again."""
    global _override
    _override = spec


def served_spec() -> PairSpec:
    """The spec models are built from: the one :func:`use_spec` set, else the served pair's record."""
    return _override if _override is not None else _recorded_spec(weights_root())


@lru_cache(maxsize=8)
def _recorded_spec(root: Path) -> PairSpec:
    try:
        record = json.loads((root / "pair.json").read_text())
    except (OSError, json.JSONDecodeError):
        return PairSpec()          # the pair's own checks (cdcca.trained_pair) name a missing or bad record
    return PairSpec.from_record(record.get("spec") if isinstance(record, dict) else None)


def _local(name: str) -> str:
    """A packaged name as is; a local directory as its absolute path (so a record names it wherever it runs)."""
    name = name.strip()
    return name if name in PACKAGED_LLMS + PACKAGED_ENCODERS else str(Path(name).expanduser().resolve())


def _check_llm(name: str) -> None:
    if name not in PACKAGED_LLMS and not Path(name, "config.json").is_file():
        raise SpecError(f"model LLM {name!r} is neither a packaged one ({', '.join(PACKAGED_LLMS)}) nor a Hugging Face "
                        "directory with a config.json")


def _check_encoder(name: str) -> None:
    if name not in PACKAGED_ENCODERS and not Path(name, "config.json").is_file():
        raise SpecError(f"model encoder {name!r} is neither a packaged one ({', '.join(PACKAGED_ENCODERS)}) nor a "
                        "Hugging Face vision-model directory with a config.json")


def _short(name: str) -> str:
    return name if name in PACKAGED_LLMS + PACKAGED_ENCODERS else Path(name).name
