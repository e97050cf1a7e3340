"""Data: corruptions keep answers (no hue shift), the stream, and the JSONL loader's clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from cdcca.data.augmix import COMPOSITIONS, TRAINING, corrupt_mixed
from cdcca.data.corruptions import ALL_CORRUPTIONS, HELD_OUT, corrupt
from cdcca.data.easyvqa import VQASet
from cdcca.data.jsonl import RowError, load_jsonl
from cdcca.data.scenario import Scenario, scenario_chunks
from cdcca.data.stream import Domain, heldout_questions, resolve_sequence, split_images


def red_square():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[16:48, 16:48] = (200, 30, 30)
    return img[None]


@pytest.mark.parametrize("name", sorted(ALL_CORRUPTIONS))
@pytest.mark.parametrize("severity", [1, 5])
def test_corruptions_keep_shape_dtype_and_hue(name, severity):
    out = corrupt(red_square(), name, severity, seed=0)
    assert out.shape == (1, 64, 64, 3) and out.dtype == np.uint8
    r, g, b = out[0, 28:36, 28:36].reshape(-1, 3).mean(0)
    assert r > g and r > b, f"{name}:{severity} moved the red square's hue"


def test_corruptions_are_deterministic_given_a_seed():
    a = corrupt(red_square(), "gaussian_noise", 3, seed=7)
    assert np.array_equal(a, corrupt(red_square(), "gaussian_noise", 3, seed=7))
    assert np.array_equal(corrupt_mixed(red_square(), ["jpeg", "fog"], (3, 5), 1), corrupt_mixed(red_square(), ["jpeg", "fog"], (3, 5), 1))


@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
@pytest.mark.parametrize("severity", [1, 5])
def test_training_compositions_keep_hue_change_the_image_and_draw_their_own_randomness(name, severity):
    images = np.concatenate([red_square()] * 4)
    out = corrupt_mixed(images, [name], (severity, severity), seed=3)
    assert out.shape == images.shape and out.dtype == np.uint8
    for img in out:
        r, g, b = img[28:36, 28:36].reshape(-1, 3).mean(0)
        assert r > g and r > b, f"{name}:{severity} moved the red square's hue"
    assert any(not np.array_equal(img, images[0]) for img in out)
    assert not all(np.array_equal(out[0], img) for img in out[1:]), "every image got the same draw"
    assert np.array_equal(out, corrupt_mixed(images, [name], (severity, severity), seed=3))


def test_a_training_family_may_name_compositions_but_never_a_held_out_type():
    from cdcca.recipes.consistency import ConsistencyConfig

    assert ConsistencyConfig(aug_family=["augmix", "spectral_noise", "jpeg"]).aug_family[0] == "augmix"
    with pytest.raises(ValueError, match=r"ConsistencyConfig.aug_family has unknown names \['elastic'\]"):
        ConsistencyConfig(aug_family=["augmix", "elastic"])
    with pytest.raises(ValueError, match="unknown names"):
        corrupt_mixed(red_square(), ["zoom_blur"], (3, 5), seed=0)


def test_held_out_corruptions_change_the_image_and_stay_out_of_every_training_family():
    from cdcca.recipes.consistency import ConsistencyConfig
    from cdcca.recipes.pretrain import PretrainConfig

    for name in HELD_OUT:
        assert not np.array_equal(corrupt(red_square(), name, 5), red_square())
    assert not set(HELD_OUT) & set(TRAINING)
    assert not set(HELD_OUT) & set(PretrainConfig.for_role("cloud").aug_family)
    assert not set(HELD_OUT) & set(ConsistencyConfig().aug_family)
    assert [str(d) for d in resolve_sequence("unseen")] == ["zoom_blur:5", "glass_blur:5", "downsample:5"]


def test_unknown_corruption_and_severity_are_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(red_square(), "hue_shift", 3)
    with pytest.raises(ValueError, match="severity"):
        corrupt(red_square(), "jpeg", 6)
    with pytest.raises(ValueError, match="unknown domain"):
        Domain.parse("hue:3")


def test_default_stream_is_a_sequence_of_shifted_domains():
    domains = resolve_sequence("default")
    assert len(domains) >= 4 and all(d.corruption != "clean" and d.severity >= 1 for d in domains)


def tiny_set(n_images=20, per_image=3):
    ids = np.repeat(np.arange(n_images), per_image)
    return VQASet("t", np.zeros((n_images, 64, 64, 3), np.uint8), [f"q{i}" for i in range(len(ids))],
                  ["yes"] * len(ids), ids, ["yes", "no"])


def test_stream_and_heldout_never_share_images():
    data = tiny_set()
    stream_imgs, held_imgs = split_images(len(data.images))
    assert not set(stream_imgs) & set(held_imgs)
    chunks = scenario_chunks(data, resolve_sequence("default"), Scenario("one-round", round_size=10))
    used = {int(data.image_ids[q]) for c in chunks for q in c.question_ids}
    held = {int(data.image_ids[q]) for q in heldout_questions(data, 30)}
    assert used <= set(stream_imgs) and held <= set(held_imgs)
    assert [c.round for c in chunks] == list(range(len(chunks)))


def write_rows(tmp_path, rows):
    Image.fromarray(red_square()[0]).save(tmp_path / "a.png")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    return path


def test_jsonl_loads_users_rows(tmp_path):
    data = load_jsonl(write_rows(tmp_path, [{"image": "a.png", "question": "what color?", "answer": "red"},
                                            {"image": "a.png", "question": "shape?", "answer": "square",
                                             "candidates": ["square", "circle"]}]))
    assert len(data) == 2 and data.images.shape == (1, 64, 64, 3)
    assert data.candidates == ["circle", "red", "square"]


@pytest.mark.parametrize("row,why", [
    ("{not json", "not valid JSON"),
    ({"image": "a.png", "question": "q"}, "missing field(s) answer"),
    ({"image": "a.png", "question": "", "answer": "red"}, "'question' must be a non-empty string"),
    ({"image": "b.png", "question": "q", "answer": "red"}, "not found"),
    ({"image": "a.png", "question": "q", "answer": "red", "candidates": ["blue"]}, "not among its candidates"),
    ({"image": "a.png", "question": "q", "answer": "red", "extra": 1}, "unknown field(s) extra"),
], ids=["json", "missing", "empty", "no-image", "candidates", "unknown"])
def test_jsonl_bad_row_names_line_and_reason(tmp_path, row, why):
    good = {"image": "a.png", "question": "q", "answer": "red"}
    with pytest.raises(RowError) as err:
        load_jsonl(write_rows(tmp_path, [good, row]))
    assert ":2:" in str(err.value) and why in str(err.value)
