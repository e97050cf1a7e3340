"""A device's adapters in peft's own layout, so that tools outside cdcca can load them.

    adapter_model.safetensors    the LoRA factors of the device's LLM — peft's own files, written by
    adapter_config.json          ``save_pretrained``: ``PeftModel.from_pretrained(llm, DIR)`` loads them
    cdcca_bridge.safetensors     what peft's files do not hold: the bridge (visual tokens → the LLM's prefix)
                                 and the LLM's RMSNorm weights cdcca trains, under cdcca's parameter names
    README.md                    the same, for whoever finds the folder

The LLM the LoRA belongs to is the device's: SmolLM2's decoder pruned to the layers in the bridge file's
``layer_ids`` metadata (:func:`cdcca.model.pair.role_model` builds it), not the full model.
"""

from __future__ import annotations

import json
from pathlib import Path

from cdcca.atomic import write_safetensors
from cdcca.model.mllm import MLLM, adapter_state

PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
BRIDGE_FILE = "cdcca_bridge.safetensors"

README = """# cdcca device adapters ({device_id}, version {version})

- `adapter_model.safetensors`, `adapter_config.json`: the LoRA of the device's LLM in peft's layout:
  `peft.PeftModel.from_pretrained(llm, "{name}")`, where `llm` is SmolLM2's decoder pruned to the decoder
  layers {layer_ids} (`cdcca.model.pair.role_model("device")` builds the whole device model).
- `{bridge}`: what peft's files do not hold — the bridge from EfficientNet-Lite0's 49 visual tokens to
  the LLM's prefix (`bridge.*`) and the LLM's trained RMSNorm weights (`*norm.weight`), under cdcca's
  parameter names (`cdcca.model.mllm.load_adapter_state` loads them with the LoRA into a cdcca model).
"""


def export_peft(model: MLLM, out_dir: str | Path, *, device_id: str = "", version: int | str = "") -> dict:
    """Write the model's adapters as peft's two files plus the bridge file (see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(out))
    rest = {name: t for name, t in adapter_state(model).items() if "lora_" not in name}
    layer_ids = model.cfg.layer_ids
    write_safetensors(out / BRIDGE_FILE, rest, metadata={
        "format": "pt", "device_id": device_id, "version": str(version), "layer_ids": json.dumps(layer_ids)})
    (out / "README.md").write_text(README.format(device_id=device_id or "?", version=version, name=out.name,
                                                 layer_ids=layer_ids or "all", bridge=BRIDGE_FILE))
    lora = sum("lora_" in n for n, _ in model.lm.named_parameters())
    return {"dir": str(out), "files": [*PEFT_FILES, BRIDGE_FILE, "README.md"], "lora_tensors": lora,
            "bridge_tensors": len(rest), "device_id": device_id, "version": version}
