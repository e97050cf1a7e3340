"""Bring your own model pair, on tiny random models built from configs (offline, seconds): a Llama-family
device, a cloud teacher of another family (Qwen2, Gemma3: another vocabulary and width) and a CLIP-style
vision tower — pretrain both roles into a weights directory, run a round end to end (UTS → AKD → DWC →
apply), and have the device answer; the label phase across vocabularies; a mismatched spec refused."""

import json

import pytest
import torch
from tests.fixtures.models import causal_lm, cross_family_pair, vision_tower
from tests.fixtures.tasks import PATTERNS, SHADES, write_task
from typer.testing import CliRunner

from cdcca.cli.main import app
from cdcca.model.spec import PairSpec, RoleSpec, SpecError


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.mark.parametrize("cloud_family", ["qwen2", "gemma3"])
def test_a_cross_family_pair_pretrains_adapts_in_a_round_and_answers(tmp_path, cloud_family):
    sets = cross_family_pair(tmp_path / "models", cloud_family)
    train, test = write_task(tmp_path / "task", n_train=12, n_test=8)
    weights = tmp_path / "W"
    for role in ("device", "cloud"):
        run("pretrain", "--role", role, "--data", train, "--eval", test, "--steps", "2", "--batch-size", "4",
            "--aug-variants", "1", "--out", weights, "--threads", "2", *sets)
    record = json.loads(run("weights", "inspect", weights, "--json"))
    spec = PairSpec.from_record(record["spec"])
    assert record["missing"] == [] and not spec.shared_tokenizer and spec.cloud.llm.endswith(cloud_family)
    assert (spec.device.layers, spec.device.queries, spec.cloud.queries) == ("every:2", 4, 6)

    # a round end to end on the pair: the device uploads, the teacher (its own tokenizer) distils, DWC ships
    # the update, the device applies it; AKD's label phase runs too, with the hidden-state term (the task's
    # answers share first tokens in the tiny vocabulary: the KL term, which reads first tokens, is refused there)
    run("demo", "--weights", weights, "--out", tmp_path / "demo", "--stream", "pixelate:5", "--set",
        "stream.rounds_per_domain=1", "--set", "stream.round_size=4", "--set", "eval.heldout_n=4", "--set",
        "eval.curve_n=4", "--set", "uts.budget=2", "--set", "akd.prefix.epochs=1", "--set", "akd.labels.epochs=1",
        "--set", "akd.labels.w_kl=0", "--set", "akd.labels.w_mse=1.0", "--set", "akd.labels.min_teacher_confidence=0",
        "--set", "uts.shift_z=0")   # the round clock: exactly the budget, 2 uploads (serving request by request, a
    # reacting fleet uploads a share of the requests instead)
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    (round_,) = metrics["rounds"]
    assert round_["uploads"] == 2 and round_["bytes_down"] > 0 and round_["version"] == 1, round_

    run("device", "init", "--state", tmp_path / "dev", "--device", "d1", "--weights", weights)
    run("device", "serve", "--state", tmp_path / "dev", "--requests", test, "--out", tmp_path / "answers.jsonl")
    answers = [json.loads(line)["answer"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 16 and set(answers) <= set(PATTERNS + SHADES)

    # a knob that disagrees with the served pair is refused in one line, before any model loads
    out = " ".join(run("demo", "--weights", weights, "--set", "model.cloud.llm=smollm2-135m", code=2).split())
    assert out.startswith("error: model.cloud.llm = 'smollm2-135m', but the served pair") and "trained with" in out


def test_the_label_phase_distils_across_vocabularies_and_widths(tmp_path):
    """A Gemma3-family teacher (vocabulary 420, width 48) and a Llama-family student (300, 32): the teacher
    scores the candidates in its own tokenizer, the student learns its pseudo-labels, its candidate
    distribution (KL) and its hidden states (through the aligner, at the visual and answer positions)."""
    from cdcca.akd.config import AKDConfig, LabelPhase, PrefixPhase, Replay
    from cdcca.akd.distill import AKD
    from cdcca.model.mllm import adapter_state
    from cdcca.model.pair import build_model, role_prompter

    encoder = vision_tower(tmp_path / "encoder")
    spec = PairSpec(encoder, RoleSpec(causal_lm(tmp_path / "s", "llama", 300, 32, 2), "all", "auto", 4, "fp32"),
                    RoleSpec(causal_lm(tmp_path / "t", "gemma3", 420, 48, 2, seed=1), "all", "auto", 6, "fp32"))
    student, teacher = build_model("device", spec), build_model("cloud", spec)
    answers = ["red", "blue", "yes", "no"]          # one first token each in both vocabularies: the KL term reads those
    prompter = role_prompter("device", answers, spec)
    assert len(prompter.tokenizer) != len(role_prompter("cloud", answers, spec).tokenizer)
    cfg = AKDConfig(prefix=PrefixPhase(epochs=0), labels=LabelPhase(epochs=2, w_kl=1.0, w_mse=1.0, batch_size=4,
                                                                     min_teacher_confidence=0.0), replay=Replay(source=0.0))
    akd = AKD(teacher, student, prompter, cfg)
    assert not akd.shared_tokenizer and akd.teacher_prompter.tokenizer is not prompter.tokenizer
    tokens, keep = torch.randn(6, 16, 24), torch.ones(6, 16, dtype=torch.bool)
    questions = ["what color is the shape?", "is there a circle?"] * 3
    records = akd.teacher_pass(tokens, keep, questions, [f"s{i}" for i in range(6)])
    assert all(r.pseudo_label in answers and r.logits.shape == (len(answers),) for r in records)
    base = adapter_state(student)
    new, stats = akd.distill("d1", base, records)
    assert stats.steps == 4 and all(torch.isfinite(torch.tensor(v)) for v in stats.losses.values())
    assert {"ce", "kl", "mse"} <= set(stats.losses)
    assert any(not torch.equal(new[k], base[k]) for k in base)


def test_a_spec_that_names_no_model_is_refused_in_one_line(tmp_path):
    with pytest.raises(SpecError, match="neither a packaged one") as err:
        RoleSpec(str(tmp_path / "nowhere"), "all", "auto", 16, "fp32")
    assert "\n" not in str(err.value)
    with pytest.raises(SpecError, match="every:N"):
        RoleSpec("smollm2-135m", "every:0", "auto", 16, "fp32")
    out = run("pretrain", "--role", "cloud", "--set", "uts.budget=3", "--out", tmp_path / "W", code=2)
    assert "pretrain reads only the models" in out


def test_a_bf16_llm_beside_an_fp32_bridge_answers(tmp_path):
    """``--dtype bf16`` (model.cloud.dtype): the LLM's weights in bf16, the bridge in fp32; the prefix is cast
    where it enters the LLM, and the candidate probabilities come back finite, in fp32."""
    from cdcca.model.answer import mc_predict
    from cdcca.model.pair import build_model, role_prompter

    cloud = RoleSpec(causal_lm(tmp_path / "t", "qwen2", 420, 48, 2), "all", "auto", 4, "bf16")
    spec = PairSpec(vision_tower(tmp_path / "encoder"), cloud, cloud)
    model = build_model("cloud", spec)
    assert model.core.embed_tokens.weight.dtype == torch.bfloat16 and model.bridge.to_lm[0].weight.dtype == torch.float32
    probs = mc_predict(model, role_prompter("cloud", ["red", "blue", "yes", "no"], spec), torch.randn(3, 16, 24),
                       ["what color is it?"] * 3)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(3))
