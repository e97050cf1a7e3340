"""``--torch-device``: a bad name fails in one line before anything loads, the name reaches the cloud's
models, and ``cpu`` gives the same numbers as the default (tiny random models, CPU only)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cdcca.akd.config import AKDConfig, LabelPhase, PrefixPhase, Replay
from cdcca.cli.main import app
from cdcca.fleet.traffic import serve_round
from cdcca.model.placement import check_torch_device
from cdcca.runtime.cloud import CloudRuntime
from cdcca.runtime.device import DeviceRuntime

torch.set_num_threads(2)
NO_CUDA = not torch.cuda.is_available()


def test_device_names_are_checked_and_normalised():
    assert check_torch_device(None) == "cpu" and check_torch_device(" cpu ") == "cpu"
    with pytest.raises(ValueError, match="not a torch device name"):
        check_torch_device("foo")
    if NO_CUDA:
        with pytest.raises(ValueError, match="no CUDA device"):
            check_torch_device("cuda:9")


@pytest.mark.parametrize("argv", [
    ["cloud", "round", "--device", "dev-0", "--out", "{tmp}/u.pkt", "--state", "{tmp}/state", "--torch-device", "foo"],
    ["demo", "--preset", "tiny", "--out", "{tmp}/state", "--torch-device", "foo"],
    ["eval", "--torch-device", "cuda:9"],
    ["bench", "paper", "--methods", "source-only,cdcca", "--out", "{tmp}/state", "--torch-device", "cuda:9"],
    ["bench", "akd", "--torch-device", "foo"],
    ["bench", "uts", "--torch-device", "foo"],
    ["bench", "dwc", "--states", "{tmp}/state", "--torch-device", "foo"],
    ["pretrain", "--role", "cloud", "--recipe", "readout", "--out", "{tmp}/state", "--torch-device", "foo"],
    ["pretrain", "--role", "cloud", "--recipe", "targets", "--out", "{tmp}/state", "--torch-device", "foo"],
])
def test_a_bad_device_name_fails_in_one_line_before_anything_loads(tmp_path, monkeypatch, argv):
    if "cuda:9" in argv and not NO_CUDA:
        pytest.skip("this machine has CUDA")
    from cdcca.model import pair

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded before the device name was checked")

    for name in ("role_model", "load_pretrained", "load_adapters_file", "tiny_model"):
        monkeypatch.setattr(pair, name, no_model)
    result = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    said = " ".join(result.output.split())        # one message (the console wraps it at its width)
    assert result.exit_code == 2 and said.startswith("error: --torch-device") and "Traceback" not in said, said
    assert said.count("error:") == 1 and not (tmp_path / "state").exists()


def test_the_device_name_reaches_the_teacher_and_the_student_not_the_stored_state(tmp_path):
    """``meta`` stands in for an accelerator: parameters move there, the shipped state stays on the CPU."""
    cloud = CloudRuntime.open(tmp_path / "cloud", tiny=True, torch_device="meta",
                              akd=AKDConfig(labels=LabelPhase(epochs=1, batch_size=4), prefix=PrefixPhase(epochs=0), replay=Replay(source=0.0)))
    assert next(cloud.akd.teacher.parameters()).device.type == "meta"
    assert next(cloud.akd.student.parameters()).device.type == "meta"
    assert cloud.akd.device == torch.device("meta")
    assert next(cloud.akd.fresh_student_state().aligner.parameters()).device.type == "meta"
    assert {t.device.type for t in cloud.initial_state.values()} == {"cpu"}


def _uplink(tmp_path) -> bytes:
    device = DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True)
    serve_round(device, 0)
    packet = device.collect_uplink()
    device.close()
    return packet


def test_a_cloud_round_on_cpu_equals_the_default_round(tmp_path):
    """Through the command line: the same packet in, the same update out (bit for bit), same metrics."""
    (tmp_path / "up.pkt").write_bytes(_uplink(tmp_path))
    outs = []
    for name, flags in (("default", []), ("cpu", ["--torch-device", "cpu"])):
        state = str(tmp_path / name)
        runner = CliRunner()
        assert runner.invoke(app, ["cloud", "receive", str(tmp_path / "up.pkt"), "--state", state, "--tiny"]).exit_code == 0
        torch.manual_seed(0)
        result = runner.invoke(app, ["cloud", "round", "--state", state, "--device", "dev-0",
                                     "--out", str(tmp_path / f"{name}.pkt"), *flags])
        assert result.exit_code == 0, result.output
        metrics = json.loads(result.stdout.strip().splitlines()[-1])["metrics"]
        outs.append((_content((tmp_path / f"{name}.pkt").read_bytes()), metrics["losses"], metrics["uploads"]))
    assert outs[0] == outs[1]


def _content(packet: bytes) -> tuple[dict, bytes]:
    """A packet's metadata without its creation time (and the digest that covers it), and its tensor bytes."""
    n = int.from_bytes(packet[:8], "little")
    meta = json.loads(packet[8:8 + n])["__metadata__"]
    return {k: v for k, v in meta.items() if k not in ("cdcca.created", "cdcca.body_sha256")}, packet[8 + n:]


def test_the_embedded_fleet_on_cpu_equals_the_default_run(tmp_path):
    """A bench-sized run (the tiny demo: stream, UTS, AKD, DWC, apply) gives the same numbers with ``cpu``."""
    from cdcca.bench.demo import run_demo

    runs = []
    from cdcca.config import resolve

    for name, extra in (("default", []), ("cpu", ['torch_device="cpu"'])):
        metrics = run_demo(resolve("tiny", sets=extra), tmp_path / name, "tiny")
        runs.append([{k: v for k, v in row.items() if not k.endswith("_s") and k != "timing"} for row in metrics["rounds"]])
    assert runs[0] == runs[1]
