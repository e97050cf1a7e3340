"""A trained pair is a directory: its record names the task, and everything downstream reads the task from
there — a stream on the pair's own test images, its answer set, refusals in one line where data and pair
disagree, and nothing of easy-VQA on a user's path."""

import json
from pathlib import Path

import pytest
from tests.fixtures.tasks import PATTERNS, SHADES, write_task
from typer.testing import CliRunner

from cdcca.data.task import Task, TaskError
from cdcca.trained_pair import PairError, active, adopt, open_pair, recorded, run_answers, run_stream, use, write_record


def user_pair(tmp_path: Path) -> tuple[Path, Task]:
    """A weights directory with only its record (enough for everything that reads the task)."""
    task = Task.from_files(*write_task(tmp_path / "task"))
    root = tmp_path / "weights"
    root.mkdir()
    write_record(root, task, {})
    return root, task


@pytest.fixture
def no_easyvqa(monkeypatch):
    """Loading easy-VQA on this path is a failure, not a fallback."""
    def refuse(split):
        raise AssertionError(f"easy-VQA {split} was loaded on a user's path")

    monkeypatch.setattr("cdcca.data.task.load_split", refuse)


def test_the_shipped_weights_are_a_pair_trained_on_easy_vqa():
    pair = open_pair()
    assert pair.shipped and pair.missing() == [] and pair.record["task"]["name"] == "easy-vqa"
    assert len(pair.answers) == 13 and recorded(pair) is None        # recorded by name, wherever installed


def test_a_user_pair_names_its_task_and_answers_and_what_it_still_lacks(tmp_path, no_easyvqa):
    root, task = user_pair(tmp_path)
    pair = open_pair(root)
    assert pair.answers == sorted(PATTERNS + SHADES) == task.answers
    assert pair.missing() == ["device.safetensors", "cloud.safetensors", "token_stats.safetensors",
                              "token_basis.safetensors"]
    with pytest.raises(PairError, match=r"has no device.safetensors; finish the pair with: cdcca pretrain .* --role device"):
        pair.file("device.safetensors")


def test_serving_a_user_pair_streams_its_own_test_images_and_never_easy_vqa(tmp_path, no_easyvqa):
    root, task = user_pair(tmp_path)
    use(root)
    assert active().root == root.resolve()
    data = run_stream("pixelate:5,gaussian_blur:5")          # the built-in shifts, on the user's images
    assert data is task.split("test") and len(data.images) == 8
    assert run_answers("default") == task.answers


def test_a_stream_file_with_answers_outside_the_pair_is_refused(tmp_path, no_easyvqa):
    root, _ = user_pair(tmp_path)
    use(root)
    other = write_task(tmp_path / "other")[1]
    text = Path(other).read_text().replace('"olive"', '"beige"')
    Path(other).write_text(text.replace('["pale pink", "deep purple", "beige"]', '["pale pink", "deep purple", "beige"]'))
    with pytest.raises(PairError, match=r"answers \['beige'\] are not in the pair's answer set \(task, 6 answers"):
        run_stream(f"pixelate:5,{other}")


def test_data_changed_since_training_is_refused(tmp_path):
    root, task = user_pair(tmp_path)
    rows = Path(task.test_path).read_text().splitlines()
    Path(task.test_path).write_text("\n".join(rows[:-2]) + "\n")
    with pytest.raises(PairError, match="changed since the pair was trained on it"):
        _ = open_pair(root).task


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such directory"),
    (lambda d: d.mkdir(), "has no pair.json: not a weights directory"),
    (lambda d: (d.mkdir(), (d / "pair.json").write_text("{")), "is not readable JSON"),
    (lambda d: (d.mkdir(), (d / "pair.json").write_text(json.dumps({"format": "other"}))), "is not a cdcca.pair/1 record"),
])
def test_a_directory_that_is_not_a_pair_is_refused_in_one_line(tmp_path, make, message):
    make(tmp_path / "w")
    with pytest.raises(PairError, match=message) as err:
        open_pair(tmp_path / "w")
    assert "\n" not in str(err.value)


def test_a_state_keeps_the_pair_it_was_created_with(tmp_path):
    root, _ = user_pair(tmp_path)
    assert adopt(None, tmp_path / "state").shipped                       # created with the shipped pair
    use(root)
    with pytest.raises(PairError, match=r"was created with the pair in .*weights, not"):
        adopt(None, tmp_path / "state")


def test_a_task_refuses_test_answers_its_train_split_cannot_teach(tmp_path):
    train, test = write_task(tmp_path)
    Path(test).write_text(Path(test).read_text().replace('"answer": "olive"', '"answer": "olive", "x": 1'))
    with pytest.raises(TaskError, match="unknown field"):
        Task.from_files(train, test).check()
    Path(test).write_text(Path(test).read_text().replace(', "x": 1', "").replace('"olive"', '"teal"'))
    with pytest.raises(TaskError, match=r"answers \['teal'\] are not in .*train.jsonl's answer set"):
        Task.from_files(train, test).check()


def test_weights_inspect_prints_the_record_and_refuses_a_non_pair(tmp_path):
    from cdcca.cli.main import app

    root, _ = user_pair(tmp_path)
    result = CliRunner().invoke(app, ["weights", "inspect", str(root)])
    assert result.exit_code == 0 and "6: deep purple, dotted" in result.output and "complete  no" in result.output
    result = CliRunner().invoke(app, ["weights", "inspect", str(tmp_path)])
    assert result.exit_code == 2 and "pair.json: not a weights directory" in " ".join(result.output.split())
