"""Prefix targets: each train image's clean prefix is optimised through the frozen cloud LLM on the image's own
questions, and the bridge is then fitted to those targets instead of its frozen self's output."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.recipes.test_consistency import TOKEN_DIM, cloud_file, views

from cdcca.model.bridge import Bridge, BridgeConfig
from cdcca.model.mllm import answer_loss
from cdcca.recipes.consistency import ConsistencyConfig, bridge_state, train_consistency
from cdcca.recipes.prefix_targets import (
    TargetConfig,
    class_mean_targets,
    image_classes,
    load_targets,
    optimise_batch,
    pick_questions,
    save_targets,
)

ANSWERS = ["yes", "red", "no", "circle", "no", "blue", "yes", "triangle"]


def test_an_image_s_facts_come_first_one_question_each_then_yes_no():
    """A fact is any answer but yes/no (easy-VQA: colour, shape; Fashion-MNIST: item, kind): no task knowledge."""
    answers = ["yes", "red", "no", "circle", "red", "no", "yes", "circle"]
    picked = pick_questions(answers, list(range(len(answers))), 4, np.random.default_rng(0))
    assert sorted(answers[r] for r in picked[:2]) == ["circle", "red"]          # one row per distinct fact
    assert [answers[r] for r in picked[2:]] and all(answers[r] in ("yes", "no") for r in picked[2:])
    assert len(set(picked)) == 4
    assert len(pick_questions(answers, [0, 2], 4, np.random.default_rng(0))) == 2     # fewer questions than asked


def test_optimised_prefixes_lower_the_frozen_llm_s_loss_and_leave_the_llm_alone(tiny_cloud, prompter):
    torch.manual_seed(0)
    for p in tiny_cloud.parameters():
        p.requires_grad_(False)
    llm_before = {k: v.clone() for k, v in tiny_cloud.lm.state_dict().items()}
    prefix = tiny_cloud.bridge(torch.randn(2, 49, 32))
    questions, answers = ["what color is the shape?", "is there a circle?", "what shape is present?"], ["red", "no", "circle"]
    owner = torch.tensor([0, 0, 1])
    text = prompter.batch(questions, answers)

    def loss(p):
        with torch.no_grad():
            return float(answer_loss(tiny_cloud, tiny_cloud.from_prefix(p[owner], text.input_ids, text.attention_mask), text.labels))

    scale = prefix.flatten(1).norm(dim=1).mean()
    optimised, before, after = optimise_batch(tiny_cloud, prompter, prefix, questions, answers, owner,
                                              TargetConfig(inner_steps=3, step_norm=float(0.2 * scale)))
    assert loss(optimised) < loss(prefix)
    assert 0 <= before <= 1 and 0 <= after <= 1
    steps = (optimised - prefix).flatten(1).norm(dim=1)
    assert torch.all(steps <= 3 * 0.2 * scale + 1e-3)                       # each image moved at most 3 steps' length
    assert all(torch.equal(v, llm_before[k]) for k, v in tiny_cloud.lm.state_dict().items())


def test_targets_are_read_back_only_under_the_same_key(tmp_path):
    path = tmp_path / "cloud.targets.safetensors"
    images, targets = np.array([3, 7]), torch.randn(2, 4, 48)
    save_targets(path, images, targets, "key-a", {"right_before": 0.5, "right_after": 0.9})
    got = load_targets(path, "key-a")
    assert got is not None and list(got[0]) == [3, 7] and torch.equal(got[1], targets) and got[2]["right_after"] == 0.9
    assert load_targets(path, "key-b") is None
    path.write_bytes(b"not a safetensors file")
    assert load_targets(path, "key-a") is None
    with pytest.raises(ValueError, match="images"):
        TargetConfig(images=0)


def test_the_bridge_moves_towards_the_targets_of_their_images(tmp_path):
    init = cloud_file(tmp_path)
    clean, corrupted = views()
    cfg = BridgeConfig(token_dim=TOKEN_DIM, n_query=4, d_bridge=32, n_layer=1, d_lm=48)
    start = Bridge(cfg).eval()
    start.load_state_dict(bridge_state(load_file(str(init))))
    images = np.array([0, 1, 2, 3])
    with torch.no_grad():
        targets = start(clean[images].float()) + 0.5                    # somewhere the frozen bridge is not
        gap_before = float(((start(clean[images].float()) - targets) ** 2).mean())
    train_consistency(init, ConsistencyConfig(steps=80, batch_size=8, lr=3e-3, checkpoint_every=1000, targets="k"),
                      tmp_path / "out", clean, corrupted, log=lambda *_: None, targets=(images, targets))
    after = Bridge(cfg).eval()
    after.load_state_dict(bridge_state(load_file(str(tmp_path / "out" / "cloud.safetensors"))))
    with torch.no_grad():
        gap_after = float(((after(clean[images].float()) - targets) ** 2).mean())
    assert gap_after < 0.5 * gap_before


def test_each_image_gets_its_own_start_plus_the_mean_change_of_its_class():
    answers = ["red", "circle", "yes", "red", "circle", "blue", "circle", "no", "green"]
    image_ids = [0, 0, 0, 1, 1, 2, 2, 2, 3]                       # image 3 has no shape question
    classes = image_classes(answers, image_ids)                   # a class: the set of an image's facts
    assert classes == {0: ("circle", "red"), 1: ("circle", "red"), 2: ("blue", "circle"), 3: ("green",)}
    start = torch.randn(4, 2, 3)
    change = {0: torch.full((2, 3), 1.0), 2: torch.full((2, 3), -2.0)}  # optimised: images 0 and 2 only
    images = np.array([0, 2])
    ids, targets = class_mean_targets(images, torch.stack([start[i] + change[i] for i in images]), start, classes)
    assert list(ids) == [0, 1, 2]                   # image 1 shares image 0's class; no image of 3's was optimised
    assert torch.allclose(targets[0], start[0] + 1.0) and torch.allclose(targets[1], start[1] + 1.0)
    assert torch.allclose(targets[2], start[2] - 2.0)
