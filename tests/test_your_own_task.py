"""Your own task, start to finish, on the real packaged models: pretrain both roles on a small generated task
(answers outside easy-VQA's 13, several of more than one token) into a weights directory, run the loop on
it, initialise a device with it, answer requests among the pair's answers, export the adapters — and never
load easy-VQA on the way."""

import json

import pytest
from tests.fixtures.tasks import PATTERNS, SHADES, write_task
from tests.uplink.test_codec import _samples
from typer.testing import CliRunner

from cdcca.cli.main import app
from cdcca.trained_pair import use
from cdcca.uplink import UTSConfig, build_uplink, decode_uplink
from cdcca.wire import PacketError

pytestmark = pytest.mark.slow


@pytest.fixture
def no_easyvqa(monkeypatch):
    def refuse(split):
        raise AssertionError(f"easy-VQA {split} was loaded on a user's path")

    monkeypatch.setattr("cdcca.data.task.load_split", refuse)
    monkeypatch.setattr("cdcca.data.easyvqa.load_split", refuse)


def run(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_pretrain_serve_and_export_a_pair_of_your_own(tmp_path, no_easyvqa):
    train, test = write_task(tmp_path / "task", n_train=12, n_test=8)
    weights = tmp_path / "W"
    for role in ("device", "cloud"):
        run("pretrain", "--role", role, "--data", train, "--eval", test, "--preset", "quick", "--steps", "2",
            "--batch-size", "4", "--out", weights, "--threads", "2")
    record = json.loads(run("weights", "inspect", weights, "--json"))
    assert record["missing"] == [] and record["task"]["answers"] == sorted(PATTERNS + SHADES)

    coded_on_shipped = build_uplink(_samples(2), UTSConfig(), device_id="d", adapter_version="0")
    use(weights)                                       # a cloud serving this pair: its own basis
    with pytest.raises(PacketError, match=r"coded with token basis .* device and cloud need the same") as err:
        decode_uplink(coded_on_shipped)
    assert "\n" not in str(err.value)

    out = run("demo", "--weights", weights, "--out", tmp_path / "demo", "--stream", "pixelate:5", "--set",
              "stream.rounds_per_domain=1", "--set", "stream.round_size=4", "--set", "eval.heldout_n=4", "--set",
              "eval.curve_n=4", "--set", "uts.budget=2", "--set", "akd.prefix.epochs=1")
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["summary"]["rounds"] == 1 and "online" in out

    run("device", "init", "--state", tmp_path / "dev", "--device", "d1", "--weights", weights)
    run("device", "serve", "--state", tmp_path / "dev", "--requests", test, "--out", tmp_path / "answers.jsonl")
    answers = [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 16 and set(answers) <= set(PATTERNS + SHADES)

    run("device", "export", "--state", tmp_path / "dev", "--peft", tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
