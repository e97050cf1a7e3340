"""Read-out tuning: the cloud's top decoder layers are trained on the cached hidden states of its frozen lower
layers; the cut must give exactly the full model's output, and nothing below the cut may move."""

import numpy as np
import pytest
import torch

from cdcca.data.easyvqa import VQASet
from cdcca.recipes.readout import ReadoutConfig, SplitLLM, readout_loss, tune_readout

QUESTIONS = ["what color is the shape?", "is there a circle?", "what shape is present?", "is there a red shape?"]
ANSWERS = ["red", "no", "circle", "yes"]


def tiny_train_set() -> VQASet:
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    return VQASet("tiny", images, QUESTIONS * 2, ANSWERS + ["blue", "yes", "triangle", "no"],
                  np.array([0, 0, 0, 0, 1, 1, 1, 1]), sorted(set(ANSWERS) | {"blue", "triangle"}))


def test_the_upper_layers_on_the_cached_lower_states_give_the_full_model_s_output(tiny_cloud, prompter):
    torch.manual_seed(0)
    tokens, text = torch.randn(4, 49, 32), prompter.batch(QUESTIONS, ANSWERS)
    tiny_cloud.eval()
    with torch.no_grad():
        full = tiny_cloud(tokens, None, text.input_ids, text.attention_mask).normed
        split = SplitLLM(tiny_cloud, 2)
        cut = split.upper_pass(*split.lower_pass(tokens, text), text)
    assert torch.allclose(cut, full, atol=1e-5)
    assert len(tiny_cloud.core.layers) == 3                          # the model is whole again afterwards


def test_read_out_tuning_lowers_the_answer_loss_and_moves_nothing_below_the_cut(tiny_cloud, prompter):
    torch.manual_seed(0)
    data, clean = tiny_train_set(), torch.randn(2, 49, 32)
    cfg = ReadoutConfig(split_layer=2, samples=32, epochs=6, lr=1e-2, batch_size=8, aug_share=0.5)
    split = SplitLLM(tiny_cloud, cfg.split_layer)
    trained = set(split.trainable())
    before = {n: p.detach().clone() for n, p in tiny_cloud.named_parameters()}
    text = prompter.batch(data.questions, data.answers)

    def loss() -> float:
        with torch.no_grad():
            return float(readout_loss(split, *split.lower_pass(clean[data.image_ids], text), text))

    start = loss()
    stats = tune_readout(tiny_cloud, cfg, data, prompter, clean, [clean + 0.1 * torch.randn_like(clean)])
    assert loss() < start and stats["steps"] == 6 * 4
    changed = {n for n, p in tiny_cloud.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained                            # only the top layer's LoRA and norms
    assert all(".layers.2." in n or "model.norm" in n for n in trained)
    assert not any(n.startswith("bridge.") for n in changed)


def test_a_cut_outside_the_decoder_and_bad_settings_are_refused(tiny_cloud):
    with pytest.raises(ValueError, match="inside the decoder's 3 layers"):
        SplitLLM(tiny_cloud, 3)
    with pytest.raises(ValueError, match="aug_share"):
        ReadoutConfig(aug_share=1.5)
    with pytest.raises(ValueError, match="must be positive"):
        ReadoutConfig(samples=0)
    assert ReadoutConfig().digest() != ReadoutConfig(lr=5e-4).digest()
