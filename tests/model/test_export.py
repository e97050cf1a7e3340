"""A device's adapters in peft's layout (src/cdcca/model/export.py, `cdcca device export --peft DIR`)."""

import json

import torch
from safetensors import safe_open
from typer.testing import CliRunner

from cdcca.cli.main import app
from cdcca.downlink import build_resync
from cdcca.runtime.device import DeviceRuntime


def test_device_export_writes_what_peft_loads_onto_the_devices_llm(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    device = DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True)
    state = device.store.current()[1]
    adapted = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}      # as after an update: LoRA B ≠ 0
    device.apply(build_resync(adapted, device_id="dev-0", version=1))
    device.close()

    result = CliRunner().invoke(app, ["device", "export", "--state", str(tmp_path / "dev"), "--peft", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["version"] == 1
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file() and (tmp_path / "peft" / "adapter_config.json").is_file()

    device = DeviceRuntime.open(tmp_path / "dev")
    llm = LlamaForCausalLM(device.model.lm.base_model.model.config)              # the device's (pruned) LLM
    loaded = dict(PeftModel.from_pretrained(llm, str(tmp_path / "peft")).named_parameters())
    lora = {name: t for name, t in adapted.items() if "lora_" in name}
    assert lora and all(torch.equal(t, loaded[name.removeprefix("lm.")]) for name, t in lora.items())
    with safe_open(str(tmp_path / "peft" / "cdcca_bridge.safetensors"), framework="pt") as f:
        rest = {k: f.get_tensor(k) for k in f.keys()}
        assert json.loads(f.metadata()["layer_ids"]) == device.model.cfg.layer_ids
    assert set(rest) == set(adapted) - set(lora) and all(torch.equal(rest[k], adapted[k]) for k in rest)
    device.close()


def test_export_of_a_missing_device_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["device", "export", "--state", str(tmp_path / "none"), "--peft", str(tmp_path / "p")])
    assert result.exit_code == 2 and "Traceback" not in result.output and not (tmp_path / "p").exists()
