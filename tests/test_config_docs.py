"""Every config dataclass documents each knob where it is declared, peft-style:
``field(default=..., metadata={"help": "..."})`` — the help is what `cdcca demo --print-config` writes above it."""

import importlib
import pkgutil
from dataclasses import fields, is_dataclass

import cdcca


def config_classes() -> dict[str, type]:
    """Every dataclass named *Config in the package, and every dataclass a config nests."""
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(cdcca.__path__, "cdcca."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, type) and is_dataclass(obj) and name.endswith("Config") and obj.__module__ == info.name:
                found[name] = obj
    for cls in list(found.values()):
        instance = cls()
        for f in fields(cls):
            value = getattr(instance, f.name)
            if is_dataclass(value):
                found.setdefault(type(value).__name__, type(value))
    return found


def undocumented(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if not str(f.metadata.get("help", "")).strip()]


def test_every_field_of_every_config_has_a_help_text():
    configs = config_classes()
    assert {"RunConfig", "StreamSection", "AKDConfig", "LabelPhase", "DWCConfig", "PretrainConfig", "BridgeConfig"} <= set(configs)
    missing = {name: undocumented(cls) for name, cls in configs.items() if undocumented(cls)}
    assert not missing, f"fields without metadata help: {missing}"

