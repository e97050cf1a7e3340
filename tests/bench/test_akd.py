"""The AKD benchmark's variants and settings: what each row means is decided here, before any training."""

import pytest

from cdcca.bench.akd import loop_config, pool_label_study, variants
from cdcca.config import RunConfig, apply


@pytest.mark.parametrize(("oracle", "teacher"), [("oracle", "prefix+labels"), ("oracle-labels-only", "labels-only")])
def test_each_oracle_differs_from_its_teacher_run_in_the_labels_alone(oracle, teacher):
    table = variants()
    with_truth, with_teacher = table[oracle], table[teacher]
    assert (with_truth.how.labels, with_teacher.how.labels) == ("oracle", "teacher")
    assert with_truth.settings == with_teacher.settings and with_truth.how.downlink == with_teacher.how.downlink == "dense"
    assert apply(RunConfig(), with_truth.settings).akd.labels.epochs > 0     # the label phase is on: the labels are used


def test_the_shipped_pipeline_is_every_default():
    table = variants()
    assert (table["cdcca"].how.downlink, table["cdcca"].how.labels, table["cdcca"].settings) == ("dwc", "teacher", {})
    assert (table["source-only"].how.downlink, table["source-only"].settings) == ("none", {})


def test_a_variants_settings_then_set_then_the_seed_make_its_run_config():
    cfg, how = loop_config("labels-only", 3, RunConfig(), ["akd.replay.source=0.5", "uts.budget=320", "stream.round_size=640"])
    assert (cfg.akd.replay.source, cfg.uts.budget, cfg.stream.round_size, how.downlink) == (0.5, 320, 640, "dense")
    assert (cfg.akd.labels.epochs, cfg.akd.prefix.epochs, cfg.seed, cfg.akd.seed) == (3, 0, 3, 3)
    with pytest.raises(ValueError, match=r"akd\.nope"):
        loop_config("cdcca", 0, RunConfig(), ["akd.nope=1"])
    with pytest.raises(ValueError, match="unknown AKD bench variant"):
        loop_config("cdcca-turbo", 0, RunConfig())


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
