"""``cdcca bench paper``: the plan of cells, resuming from finished cells, and tables built from rows."""

import json

import pytest

from cdcca.bench import paper, paper_report
from cdcca.config import flatten, resolve

DOMAINS = ["pixelate:5", "jpeg:5"]


def _row(method, seed, mc, da=None, down=0, clean=0.99):
    """A bench row: two rounds per domain; online MC is the held-out figure − 0.05 in a domain's first
    round (its update has not landed yet) and the held-out figure in its second."""
    return {"variant": method, "seed": seed, "adapted_mc": mc, "adapted_da": da if da is not None else mc - 0.01,
            "heldout": {d: mc + (0.02 if i else -0.02) for i, d in enumerate(DOMAINS)},
            "heldout_da": {d: mc for d in DOMAINS}, "source_mc": clean, "source_da": clean,
            "online_per_round": [mc - 0.05, mc] * len(DOMAINS), "domains": [d for d in DOMAINS for _ in range(2)],
            "steps": [0, 1] * len(DOMAINS), "uploads": 128, "bytes_up_per_round": 1000.0 * (1 + seed),
            "bytes_down_per_round": float(down)}


def _fake_rows(p):
    score = {"source-only": 0.70, "bn": 0.71, "tent": 0.72, "tent+bn": 0.72, "eata": 0.73, "cotta": 0.71,
             "pseudo-label": 0.74, "cdcca-dense": 0.78, "cdcca": 0.77, "teacher": 0.80, "oracle": 0.82,
             "loss:ce+mse": 0.745, "loss:ce+mse+wave": 0.75, "loss:full": 0.75}
    rows = {}
    for c in p.cells():
        keep = dict(s.split("=") for s in c.settings).get("uts.keep_ratio")
        mc = score[c.method] + 0.01 * c.seed - (0.02 if keep else 0.0)
        rows[c] = _row(c.method, c.seed, mc, down=250_000 if c.method == "cdcca" else 3_000_000)
    return rows


QUICK, FULL = resolve("quick", kind="bench-paper"), resolve("full", kind="bench-paper")
SIZES = {"png_bytes": 3000.0, "jpeg224_bytes": 5000.0, "adapter_entries": 2_000_000, "device_params": 60_000_000}


def test_quick_plan_covers_the_issue_methods_and_shares_cells():
    p = paper.plan("quick", QUICK, [0, 1, 2])
    assert {"source-only", "tent", "cotta", "eata", "pseudo-label", "cdcca-dense", "cdcca", "teacher",
            "oracle"} <= set(p.table1)
    assert [c.seed for c in p.table1["cdcca"]] == [0, 1, 2]
    assert len(p.table1["teacher"]) == 1                         # seed-independent: evaluated once
    assert all(len(cells) == 1 for cells in p.table3.values())   # quick: ablations on the first seed
    assert p.table4[0.5][0] in p.table1["cdcca"]                 # keep 0.5 is the shipped cdcca cell
    assert len(p.cells()) == len(set(p.cells()))
    full = paper.plan("full", FULL, [0, 1])
    assert all(len(cells) == 2 for cells in full.table4.values())


def test_plan_rejects_an_unknown_preset_and_no_seeds():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose from full, quick"):
        resolve("huge", kind="bench-paper")
    with pytest.raises(ValueError, match="seed"):
        paper.plan("quick", QUICK, [])


def test_cell_keys_change_with_everything_that_determines_a_run():
    quick, full = QUICK, FULL
    a = paper.Cell("cdcca", "loop", 0)
    assert a.key(quick) == paper.Cell("cdcca", "loop", 0).key(quick)
    assert len({a.key(quick), a.key(full), paper.Cell("cdcca", "loop", 1).key(quick),
                paper.Cell("cdcca", "loop", 0, ("uts.keep_ratio=0.25",)).key(quick)}) == 4


def test_tables_are_means_and_spreads_over_seeds_with_generated_claims():
    p = paper.plan("quick", QUICK, [0, 1, 2])
    result = paper_report.build_tables(p, _fake_rows(p), flatten(QUICK), 10.0, SIZES)
    mean = {r["method"]: r for r in result["table1"] if r["domain"] == "mean"}
    assert mean["cdcca"]["mc_mean"] == pytest.approx(0.78) and mean["cdcca"]["mc_std"] == pytest.approx(0.00816, abs=1e-4)
    assert mean["teacher"]["n_seeds"] == 1
    assert {r["domain"] for r in result["table1"]} == {*DOMAINS, "mean", "clean"}
    assert mean["cdcca"]["online_mean"] == pytest.approx(0.755) and mean["cdcca"]["online_std"] == pytest.approx(0.00816, abs=1e-4)
    assert {r["domain"]: r["online_mean"] for r in result["table1"] if r["method"] == "cdcca"}["jpeg:5"] == pytest.approx(0.755)
    assert result["recovery"]["cdcca"] == pytest.approx([0.73, 0.78])
    assert result["gains"]["tent"][0] == pytest.approx(5.0) and result["online_gains"]["tent"][0] == pytest.approx(5.0)
    claims = {c["claim"]: c for c in result["claims"]}
    assert claims["CDCCA beats tent on the shifted-domain mean held-out MC"]["holds"]
    assert claims["CDCCA beats tent on online MC (the answers users got)"]["holds"]
    assert claims["paper: +3.64 MC over the best baseline (online MC here)"]["holds"]          # +4 over EATA
    assert not claims["paper: AKD's feature losses add +2.53 MC over pseudo-labels alone"]["holds"]
    assert claims["paper: keeping 50 % of the tokens is best"]["holds"]
    up = [r for r in result["table5"] if r["link"] == "uplink"]
    assert up[0]["x_cdcca"] == 1.0 and up[1]["bytes_per_round"] == (128 // 4 * 49 * 1280 * 2)   # 128 uploads over 4 rounds
    json.dumps(result)


def test_methods_run_a_subset_of_table1_without_the_ablations():
    p = paper.plan("quick", QUICK, [0, 1], ["source-only", "tent", "cdcca"])
    assert list(p.table1) == ["source-only", "tent", "cdcca"] and not p.table3 and not p.table4
    result = paper_report.build_tables(p, _fake_rows(p), flatten(QUICK), 10.0, SIZES)
    assert {r["method"] for r in result["table1"]} == {"source-only", "tent", "cdcca"} and result["table5"] == []
    assert "online jpeg:5" in paper_report.markdown(result)
    with pytest.raises(ValueError, match="unknown method"):
        paper.plan("quick", QUICK, [0], ["cdcca", "magic"])


def test_the_teacher_alone_makes_a_table_too():
    """A bound measured on its own (no streamed row: no online figures) still gets its table."""
    p = paper.plan("quick", QUICK, [0], ["teacher"])
    rows = {c: {k: v for k, v in r.items() if k not in ("online_per_round", "domains", "steps")}
            for c, r in _fake_rows(p).items()}
    result = paper_report.build_tables(p, rows, flatten(QUICK), 10.0, SIZES)
    assert {r["method"] for r in result["table1"]} == {"teacher"} and result["domains"] == DOMAINS


def test_run_paper_resumes_from_finished_cells(tmp_path, monkeypatch):
    p = paper.plan("quick", QUICK, [0])
    rows = _fake_rows(p)
    ran, stop_at = [], [3]

    def fake_run(cell, models, preset):
        ran.append(cell)
        if len(ran) == stop_at[0]:
            raise RuntimeError("stopped part-way")
        return rows[cell]

    monkeypatch.setattr(paper, "run_cell", fake_run)
    monkeypatch.setattr(paper.BenchModels, "load", classmethod(lambda cls, *a, **k: None))
    monkeypatch.setattr(paper, "reference_sizes", lambda models: SIZES)
    with pytest.raises(RuntimeError, match="stopped"):
        paper.run_paper("quick", QUICK, [0], tmp_path)
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2
    ran.clear()
    stop_at[0] = 0
    result = paper.run_paper("quick", QUICK, [0], tmp_path)
    assert len(ran) == len(p.cells()) - 2                         # only the unfinished cells ran again
    assert (tmp_path / "report.html").read_text().count("<table>") == 6      # Tables 1, 3, 4, 5, recovery, claims
    assert "| cdcca |" in (tmp_path / "tables.md").read_text()
    assert result["table1"]


def test_results_page_block_is_replaced_and_a_page_without_markers_is_refused(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text(f"# R\nbefore\n{paper_report.RESULTS_BEGIN}\nold\n{paper_report.RESULTS_END}\nafter\n")
    paper_report.update_results_page(page, "new table\n")
    assert page.read_text() == f"# R\nbefore\n{paper_report.RESULTS_BEGIN}\nnew table\n{paper_report.RESULTS_END}\nafter\n"
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        paper_report.update_results_page(tmp_path / "plain.md", "x")


def test_a_cell_run_with_other_settings_is_stale(tmp_path, monkeypatch):
    from cdcca.bench import baselines

    preset = QUICK
    store = paper.CellStore(tmp_path, preset)
    cell = paper.Cell("tent", "device", 0)
    store.put(cell, {"adapted_mc": 0.7})
    assert store.get(cell)["adapted_mc"] == 0.7
    import functools

    new_default = functools.partial(baselines.BaselineConfig, tent=baselines.TentConfig(lr=5e-3))
    monkeypatch.setattr(paper, "BaselineConfig", new_default)                         # a new default rate
    assert store.get(cell) is None
