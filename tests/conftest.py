from cdcca.akd.config import LabelPhase

"""Shared fixtures: tiny random-initialised models of the real architecture, the real tokenizer."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)

CANDIDATES = ['circle', 'green', 'red', 'gray', 'yes', 'teal', 'black', 'rectangle', 'yellow', 'triangle', 'brown', 'blue', 'no']


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _shipped_pair(monkeypatch):
    """Every test starts serving the shipped pair, built from its record; one that serves another (``use(DIR)``,
    or ``cdcca pretrain --set model.…``, or ``--weights``) is undone after it."""
    from cdcca.model.spec import use_spec

    monkeypatch.delenv("CDCCA_WEIGHTS", raising=False)
    yield
    use_spec(None)
    os.environ.pop("CDCCA_WEIGHTS", None)      # a command's --weights sets it; a module-scoped fixture must not see it


@pytest.fixture(scope="session")
def tokenizer():
    from cdcca.assets import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def prompter(tokenizer):
    from cdcca.model.prompt import Prompter

    return Prompter(tokenizer, CANDIDATES)


@pytest.fixture
def tiny_device():
    from cdcca.model.pair import tiny_model

    return tiny_model("device", seed=0)


@pytest.fixture
def tiny_cloud():
    from cdcca.model.pair import tiny_model

    return tiny_model("cloud", seed=1)


def open_test_cloud(state_dir):
    """A cloud runtime on tiny models with a short AKD round and a 16 KiB downlink."""
    from cdcca.akd.config import AKDConfig
    from cdcca.downlink import DWCConfig
    from cdcca.runtime.cloud import CloudRuntime

    return CloudRuntime.open(state_dir, tiny=True, akd=AKDConfig(labels=LabelPhase(epochs=1, batch_size=4)),
                             dwc=DWCConfig(budget_bytes=16 * 1024))


@pytest.fixture
def cloud(tmp_path):
    """:func:`open_test_cloud` in the test's folder."""
    c = open_test_cloud(tmp_path / "cloud")
    yield c
    c.close()


@pytest.fixture
def device(tmp_path):
    """A device runtime "dev-0" on tiny models, at version 0 of the shipped adapters."""
    from cdcca.runtime.device import DeviceRuntime

    d = DeviceRuntime.create(tmp_path / "dev", "dev-0", tiny=True)
    yield d
    d.close()
