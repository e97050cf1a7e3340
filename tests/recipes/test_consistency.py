"""Teacher robustness by feature consistency: the cloud's bridge learns to give corrupted, partly dropped
tokens the prefix its frozen self gives the clean tokens — and only the bridge changes."""

import hashlib
import json
from itertools import pairwise

import pytest
import torch
from safetensors.torch import load_file, save_file

from cdcca.model.bridge import Bridge, BridgeConfig
from cdcca.recipes.consistency import ConsistencyConfig, bridge_state, consistency_loss, train_consistency

TOKEN_DIM = 32


def cloud_file(tmp_path):
    """A cloud.safetensors with a random bridge and one stand-in LLM adapter tensor."""
    torch.manual_seed(0)
    bridge = Bridge(BridgeConfig(token_dim=TOKEN_DIM, n_query=4, d_bridge=32, n_layer=1, d_lm=48))
    state = {f"bridge.{k}": v.half() for k, v in bridge.state_dict().items()}
    state["lm.layers.0.input_layernorm.weight"] = torch.ones(8).half()
    path = tmp_path / "init" / "cloud.safetensors"
    path.parent.mkdir()
    save_file(state, str(path))
    return path


def views(n=24):
    clean = torch.randn(n, 49, TOKEN_DIM).half()
    offset = 2 * torch.randn(1, 1, TOKEN_DIM)                   # a systematic corruption of the same images
    corrupted = (clean.float() * 0.5 + offset).half()
    return clean, [corrupted]


def test_consistency_training_pulls_corrupted_views_to_the_clean_prefix_and_keeps_the_llm(tmp_path):
    init = cloud_file(tmp_path)
    clean, corrupted = views()
    cfg = ConsistencyConfig(steps=60, batch_size=8, lr=3e-3, checkpoint_every=1000)
    before = Bridge(BridgeConfig(token_dim=TOKEN_DIM, n_query=4, d_bridge=32, n_layer=1, d_lm=48)).eval()
    before.load_state_dict(bridge_state(load_file(str(init))))
    keep = torch.ones(8, 49, dtype=torch.bool)
    with torch.no_grad():
        target = before(clean[:8].float())
        gap_before = consistency_loss(before, target, corrupted[0][:8].float(), keep, clean[:8].float(), 0.0)["corrupted"]
    record = train_consistency(init, cfg, tmp_path / "out", clean, corrupted, log=lambda *_: None)
    out = tmp_path / "out" / "cloud.safetensors"
    after = Bridge(BridgeConfig(token_dim=TOKEN_DIM, n_query=4, d_bridge=32, n_layer=1, d_lm=48)).eval()
    trained = load_file(str(out))
    after.load_state_dict(bridge_state(trained))
    with torch.no_grad():
        gap_after = consistency_loss(after, target, corrupted[0][:8].float(), keep, clean[:8].float(), 0.0)["corrupted"]
    assert gap_after < 0.5 * gap_before
    assert torch.equal(trained["lm.layers.0.input_layernorm.weight"], load_file(str(init))["lm.layers.0.input_layernorm.weight"])
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert record["init_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    init = cloud_file(tmp_path)
    clean, corrupted = views()
    cfg = ConsistencyConfig(steps=6, batch_size=4, checkpoint_every=3)
    train_consistency(init, cfg, tmp_path / "a", clean, corrupted, log=lambda *_: None)

    calls = []

    def stop_after_checkpoint(step, _loss):
        calls.append(step)
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_consistency(init, cfg, tmp_path / "b", clean, corrupted, progress=stop_after_checkpoint, log=lambda *_: None)
    assert (tmp_path / "b" / "cloud.consistency.ckpt.safetensors").is_file()
    train_consistency(init, cfg, tmp_path / "b", clean, corrupted, log=lambda *_: None)
    a, b = (load_file(str(tmp_path / d / "cloud.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)   # bit for bit


def test_bad_config_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="aug_family"):
        ConsistencyConfig(aug_family=["hue_shift"])


def test_shipped_cloud_weights_match_their_recorded_hash():
    from cdcca.model.pair import weights_file

    path = weights_file("cloud")
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shipped_cloud_record_chains_its_stages_and_ties_each_targets_stage_to_the_weights_it_optimised_through():
    from cdcca.model.pair import weights_file
    from cdcca.recipes.prefix_targets import TargetConfig
    from cdcca.recipes.readout import ReadoutConfig

    record = json.loads(weights_file("cloud").with_suffix(".json").read_text())
    stages = record["stages"]
    assert [stage.get("recipe", "end-to-end") for stage in stages] == [
        "end-to-end", "consistency", "targets", "targets", "targets", "readout", "readout"]
    assert all(a["sha256"] == b["init_sha256"] for a, b in pairwise(stages))   # a chain
    assert stages[-1]["sha256"] == record["sha256"]
    for stage in (s for s in stages if s.get("recipe") == "targets"):
        targets = stage["targets"]
        assert targets["key"] == f"{TargetConfig(**targets['config']).digest()}-{stage['init_sha256'][:16]}"
        assert targets["right_after"] > targets["right_before"]
    for stage in (s for s in stages if s.get("recipe") == "readout"):
        assert stage["digest"] == ReadoutConfig(**stage["config"]).digest()