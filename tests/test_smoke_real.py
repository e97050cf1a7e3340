"""Bounded smoke tests on the real packaged weights (SmolLM2 GGUF, EfficientNet-Lite0, easy-VQA)."""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_device():
    from cdcca.model.pair import load_pretrained

    return load_pretrained("device")


def test_assets_are_found_and_the_llm_cache_loads():
    from cdcca.assets import build_llm_cache, load_llm
    from cdcca.model.llm import prune_layers

    path = build_llm_cache()
    lm = prune_layers(load_llm(), [0, 29])
    assert (path / "model.safetensors").is_file() and lm.config.num_hidden_layers == 2


def test_shipped_weights_match_their_recorded_sha256():
    import hashlib

    from cdcca.model.pair import pretrain_record, weights_file

    for role in ("device", "cloud"):
        record = pretrain_record(role)
        assert hashlib.sha256(weights_file(role).read_bytes()).hexdigest() == record["sha256"]


def test_pretrained_device_answers_clean_easy_vqa(real_device, prompter):
    from cdcca.data.easyvqa import load_split
    from cdcca.data.stream import heldout_questions
    from cdcca.model.encoder import encode_images, load_encoder
    from cdcca.runtime.evaluate import accuracy

    data = load_split("test")
    qids = heldout_questions(data, 48)
    imgs = np.unique(data.image_ids[qids])
    tokens = torch.zeros(len(data.images), 49, 1280, dtype=torch.float16)
    tokens[imgs] = encode_images(load_encoder(), data.images[imgs])
    res = accuracy(real_device, prompter, data, qids, tokens)
    assert res["mc"] >= 0.8 and res["da"] >= 0.8, res


def test_missing_pretrained_weights_give_a_clear_error(tmp_path):
    from cdcca.assets import AssetError
    from cdcca.model.pair import load_pretrained

    with pytest.raises(AssetError, match="cdcca pretrain --role device"):
        load_pretrained("device", root=tmp_path)


def test_eval_on_your_own_jsonl_file(tmp_path):
    """`cdcca eval --model device --data FILE.jsonl --json` on easy-VQA images written as a user's files."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from cdcca.cli.main import app
    from cdcca.data.easyvqa import load_split

    data = load_split("test")
    rows = []
    for q in range(0, 40, 5):
        img = int(data.image_ids[q])
        Image.fromarray(data.images[img]).save(tmp_path / f"{img}.png")
        rows.append({"image": f"{img}.png", "question": data.questions[q], "answer": data.answers[q]})
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = CliRunner().invoke(app, ["eval", "--model", "device", "--data", str(tmp_path / "mine.jsonl"), "--json",
                                      "--threads", "2"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"model", "data", "n", "da", "mc"} and out["n"] == 8 and out["model"] == "device"
    assert out["mc"] >= 0.75                       # clean easy-VQA images: the device knows them
    mixed = CliRunner().invoke(app, ["eval", "--model", "device", "--stream", f"pixelate:5,{tmp_path / 'mine.jsonl'}",
                                     "--n", "8", "--no-direct", "--json", "--threads", "2"])
    assert mixed.exit_code == 0, mixed.output
    domains = json.loads(mixed.stdout.strip().splitlines()[-1])["domains"]
    assert [d["shift"] for d in domains] == ["pixelate", str(tmp_path / "mine.jsonl")]
    assert 0 < domains[1]["n"] < 8       # the held-out half of the file's images only
