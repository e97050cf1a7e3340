"""The AKD benchmark's variants and settings: what each row means is decided here, before any training."""

import pytest

from cdcca.bench.akd import apply_settings, pool_label_study, variants
from cdcca.bench.loop import LoopConfig


@pytest.mark.parametrize(("oracle", "teacher"), [("oracle", "prefix+labels"), ("oracle-labels-only", "labels-only")])
def test_each_oracle_differs_from_its_teacher_run_in_the_labels_alone(oracle, teacher):
    table = variants()
    with_truth, with_teacher = dict(table[oracle]), dict(table[teacher])
    assert with_truth.pop("labels") == "oracle" and "labels" not in with_teacher
    assert with_truth == with_teacher                         # same uploads, AKD recipe, dense downlink
    assert with_truth["akd"].epochs > 0                       # the label phase is on: the labels are used


def test_the_shipped_pipeline_is_every_default():
    table = variants()
    assert table["cdcca"] == {"downlink": "dwc"}              # the shipped pipeline: every default, DWC on
    assert table["source-only"] == {"downlink": "none"}


def test_settings_override_nested_fields_and_are_validated():
    cfg = apply_settings(LoopConfig(), ["akd.source_replay=0.5", "uts.budget=320", "round_size=640", "labels=oracle"])
    assert (cfg.akd.source_replay, cfg.uts.budget, cfg.round_size, cfg.labels) == (0.5, 320, 640, "oracle")
    with pytest.raises(ValueError, match=r"akd\.nope"):
        apply_settings(LoopConfig(), ["akd.nope=1"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        apply_settings(LoopConfig(), ["uts.budget"])
    with pytest.raises(ValueError, match="skip_top"):          # the config's own validation still runs
        apply_settings(LoopConfig(), ["uts.skip_top=1.5"])


def test_label_study_pools_domains_weighted_by_kept_uploads():
    rows = [{"budget": 128, "skip_top": 0.0, "labels": "teacher", "gate": 0.8, "uploads": 128, "kept": 100,
             "teacher_mc": 0.9, "device_mc": 0.7},
            {"budget": 128, "skip_top": 0.0, "labels": "teacher", "gate": 0.8, "uploads": 128, "kept": 50,
             "teacher_mc": 0.6, "device_mc": 0.4},
            {"budget": 128, "skip_top": 0.0, "labels": "teacher", "gate": 0.9, "uploads": 128, "kept": 0,
             "teacher_mc": None, "device_mc": None}]
    pooled = {r["gate"]: r for r in pool_label_study(rows)}
    assert pooled[0.8]["kept"] == 150 and pooled[0.8]["uploads"] == 256
    assert pooled[0.8]["teacher_mc"] == pytest.approx(0.8) and pooled[0.8]["device_mc"] == pytest.approx(0.6)
    assert pooled[0.9]["teacher_mc"] is None
