"""Prefix distillation on tiny models: the map is a ridge regression, only the bridge moves, and the
device's bridge comes closer to the translated teacher prefix on the uploads."""

import random

import pytest
import torch

from cdcca.akd.config import LabelPhase, PrefixPhase, Replay
from cdcca.akd.distill import AKD, AKDConfig
from cdcca.akd.prefix import PrefixMap, PrefixTeacher, bridge_prefix, relative_mse, train_prefix
from cdcca.akd.source_set import random_source_set
from cdcca.model.mllm import adapter_state


def test_prefix_map_recovers_a_linear_map_with_bias():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, 6, generator=gen)
    w, b = torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen)
    pmap = PrefixMap.fit(x, x @ w + b, ridge=1e-6)
    assert torch.allclose(pmap(x), x @ w + b, atol=1e-3)
    assert pmap.weight.shape == (7, 5)


def test_ridge_shrinks_the_map():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 2, 6, generator=gen)
    y = x @ torch.randn(6, 6, generator=gen)
    small, large = PrefixMap.fit(x, y, 1e-3), PrefixMap.fit(x, y, 1e4)
    assert large.weight[:-1].norm() < 0.1 * small.weight[:-1].norm()


def test_training_pulls_the_bridge_to_its_targets_and_keeps_the_anchor(tiny_device, tiny_cloud):
    source = torch.randn(16, 49, 32).half()
    teacher = PrefixTeacher.fit(tiny_cloud.bridge, tiny_device.bridge, source, ridge=1.0)
    tokens, keep = torch.randn(8, 49, 32), torch.ones(8, 49, dtype=torch.bool)
    targets = teacher.map(bridge_prefix(tiny_cloud.bridge, tokens, keep))
    before = relative_mse(bridge_prefix(tiny_device.bridge, tokens, keep), targets, teacher.scale)
    stats = train_prefix(tiny_device.bridge, teacher, tokens, keep, targets, epochs=30, batch_size=4, lr=1e-3,
                         source_ratio=1.0, grad_clip=2.0, rng=random.Random(0))
    after = relative_mse(bridge_prefix(tiny_device.bridge, tokens, keep), targets, teacher.scale)
    assert after < 0.5 * before
    assert stats["prefix_steps"] == 60 and stats["prefix_source"] > 0
    assert not tiny_device.bridge.training


def test_prefix_only_distillation_changes_the_bridge_and_nothing_else(tiny_device, tiny_cloud, prompter):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(epochs=0, min_teacher_confidence=0.0), prefix=PrefixPhase(epochs=3)),
              source=random_source_set(32, prompter.candidates))
    tokens, keep = torch.randn(4, 49, 32), torch.ones(4, 49, dtype=torch.bool)
    records = akd.teacher_pass(tokens, keep, ["what shape is it?"] * 4, [f"s{i}" for i in range(4)])
    assert records[0].prefix.shape == (2, 32)       # tiny bridge: 2 queries of width 32
    base = adapter_state(tiny_device)
    new, stats = akd.distill("d0", base, records)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed and all(k.startswith("bridge.") for k in changed)
    assert stats.losses["prefix_steps"] == 3


def test_prefix_distillation_needs_the_source_set_and_something_to_train(tiny_device, tiny_cloud, prompter):
    with pytest.raises(ValueError, match="source set"):
        AKD(tiny_cloud, tiny_device, prompter, AKDConfig(prefix=PrefixPhase(epochs=2), replay=Replay(source=0.0)))
    with pytest.raises(ValueError, match="nothing would be trained"):
        AKDConfig(labels=LabelPhase(epochs=0), prefix=PrefixPhase(epochs=0))


def test_the_input_group_moves_only_the_bridge_input_side(tiny_device, tiny_cloud):
    source = torch.randn(8, 49, 32).half()
    teacher = PrefixTeacher.fit(tiny_cloud.bridge, tiny_device.bridge, source, ridge=1.0)
    tokens, keep = torch.randn(4, 49, 32), torch.ones(4, 49, dtype=torch.bool)
    before = {k: v.clone() for k, v in tiny_device.bridge.state_dict().items()}
    train_prefix(tiny_device.bridge, teacher, tokens, keep, teacher.map(bridge_prefix(tiny_cloud.bridge, tokens, keep)),
                 epochs=2, batch_size=2, lr=1e-3, source_ratio=0.0, grad_clip=2.0, rng=random.Random(0), group="input")
    changed = {k for k, v in tiny_device.bridge.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"token_norm.weight", "token_norm.bias", "token_proj.weight", "token_proj.bias", "pos"}


def test_a_span_confines_the_token_projection_change_and_leaves_a_plain_weight(tiny_device, tiny_cloud):
    """Uploads that reached the cloud in a code: the round's change of the token projection stays in the
    code's span (W₀ + ΔW·A·B, so A·B leaves it unchanged) and the bridge keeps an ordinary weight."""
    from cdcca.uplink.codec import code_span_factors, fit_token_basis, parse_code

    source = torch.randn(16, 49, 32).half()
    teacher = PrefixTeacher.fit(tiny_cloud.bridge, tiny_device.bridge, source, ridge=1.0)
    basis = fit_token_basis(torch.rand(400, 32) * 6, k=8)
    a, b = code_span_factors(tiny_device.bridge.token_norm.weight.detach(), parse_code("pca8-ec"), basis)
    tokens, keep = torch.randn(8, 49, 32), torch.ones(8, 49, dtype=torch.bool)
    targets = teacher.map(bridge_prefix(tiny_cloud.bridge, tokens, keep))
    before = tiny_device.bridge.token_proj.weight.detach().clone()
    train_prefix(tiny_device.bridge, teacher, tokens, keep, targets, epochs=3, batch_size=4, lr=1e-3,
                 source_ratio=1.0, grad_clip=2.0, rng=random.Random(0), span=(a, b))
    change = tiny_device.bridge.token_proj.weight.detach() - before
    assert change.abs().max() > 0 and torch.allclose(change @ a @ b, change, atol=1e-5)
    assert "weight" in dict(tiny_device.bridge.token_proj.named_parameters())     # no parametrization left behind
