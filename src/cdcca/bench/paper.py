"""``cdcca bench paper``: the analogues of the paper's Tables 1, 3, 4 and 5 from one command.

Every table cell is one run of a method on one seed (a *cell*), stored as JSON under ``OUT/cells``
as soon as it finishes, keyed by everything that determines it; a stopped run resumes from the
finished cells, and a cell two tables share (e.g. CDCCA at keep ratio 0.5 in Tables 1 and 4) runs
once. The tables, plots and report are rebuilt from the cells (:mod:`cdcca.bench.paper_report`).

- Table 1: methods × shifted domains, held-out MC and DA after the whole stream, mean ± std over
  seeds; device-only baselines (TENT, EATA, CoTTA, encoder BatchNorm re-estimation), the methods that
  use the cloud, the cloud teacher itself and the oracle (true labels on the same uploads) as bounds.
- Table 3: the paper's AKD loss ablation (its label phase alone, dense downlink), next to the shipped AKD.
- Table 4: the uplink's token keep ratio 0.25 / 0.5 / 0.75 / 1.0 in the shipped pipeline.
- Table 5: bytes per round up and down, and their transfer time at a stated link speed, against raw
  frames and the full model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cdcca.atomic import write_json
from cdcca.bench.akd import BenchModels, loop_config, run_variant, summarize
from cdcca.bench.baselines import BaselineConfig, run_device_only
from cdcca.bench.loop import measure_heldout
from cdcca.bench.paper_report import build_tables, write_outputs
from cdcca.bench.uts import jpeg224_bytes
from cdcca.config import RunConfig, flatten
from cdcca.data.corruptions import corrupt
from cdcca.data.stream import resolve_sequence, split_images
from cdcca.uplink import UTSConfig
from cdcca.uplink.plan import png_bytes

# Table 1 method → how it runs: a bench-akd loop variant, a device-only method, or the teacher's evaluation
TABLE1 = {"source-only": "loop", "bn": "device", "tent": "device", "tent+bn": "device", "eata": "device",
          "cotta": "device", "pseudo-label": "loop", "cdcca-dense": "loop", "cdcca": "loop", "teacher": "teacher",
          "oracle": "loop"}
# Table 3's CE row is the pseudo-label method of Table 1 (CE on the teacher's labels, unweighted): the
# paper's "pseudo-labels alone", against which it claims AKD's feature losses add +2.53
TABLE3 = {"CE (pseudo-labels alone)": "pseudo-label", "CE + MSE": "loss:ce+mse", "CE + MSE + wavelet": "loss:ce+mse+wave",
          "CE + MSE + wavelet + KD (paper's AKD)": "loss:full", "shipped AKD (prefix distillation)": "cdcca-dense"}
TABLE4 = (0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Cell:
    """One run: ``kind`` "loop" (a variant of the collaborative loop), "device" (a device-only
    baseline) or "teacher" (the cloud's own held-out accuracy, seed-independent)."""

    method: str
    kind: str
    seed: int
    settings: tuple[str, ...] = ()

    def key(self, base: RunConfig) -> str:
        blob = json.dumps([self.method, self.kind, self.seed if self.kind != "teacher" else None,
                           list(self.settings), flatten(base)], sort_keys=True)
        return f"{self.method.replace(':', '_').replace('+', 'p')}-s{self.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


@dataclass
class PaperPlan:
    preset: str
    seeds: list[int]
    table1: dict[str, list[Cell]] = field(default_factory=dict)
    table3: dict[str, list[Cell]] = field(default_factory=dict)
    table4: dict[float, list[Cell]] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every distinct cell, Table 1 first (the headline), then the ablations."""
        out: list[Cell] = []
        for group in (self.table1, self.table3, self.table4):
            for cells in group.values():
                out += [c for c in cells if c not in out]
        return out


def plan(preset_name: str, base: RunConfig, seeds: list[int], methods: list[str] | None = None) -> PaperPlan:
    """Every cell of the run; ``methods`` runs those Table 1 rows only (and no ablation tables)."""
    if not seeds:
        raise ValueError("give at least one seed, e.g. --seeds 0,1,2")
    unknown = set(methods or []) - set(TABLE1)
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(TABLE1)}")
    ablation = seeds[:base.eval.ablation_seeds] if base.eval.ablation_seeds else seeds
    p = PaperPlan(preset_name, list(seeds))
    for method, kind in TABLE1.items():
        if methods and method not in methods:
            continue
        p.table1[method] = [Cell(method, kind, seeds[0] if kind == "teacher" else s)
                            for s in (seeds[:1] if kind == "teacher" else seeds)]
    if methods:
        return p
    for label, variant in TABLE3.items():
        p.table3[label] = [Cell(variant, "loop", s) for s in ablation]
    for ratio in TABLE4:
        settings = () if ratio == UTSConfig().keep_ratio else (f"uts.keep_ratio={ratio}",)
        p.table4[ratio] = [Cell("cdcca", "loop", s, settings) for s in ablation]
    return p


def run_cell(cell: Cell, models: BenchModels, base: RunConfig) -> dict:
    """Run one cell from the pretrained pair and return its bench row."""
    if cell.kind == "loop":
        return run_variant(models, cell.method, cell.seed, base, list(cell.settings))
    if cell.kind == "device":

        cfg, _ = loop_config("source-only", cell.seed, base)
        t0 = time.perf_counter()
        res = run_device_only(cfg, BaselineConfig(method=cell.method), models.fresh_device(), models.prompter,
                              models.data, source=models.source_set() if cell.method == "eata" else None)
        row = summarize(cell.method, cell.seed, res, time.perf_counter() - t0)
        row["baseline"] = BaselineConfig(method=cell.method).settings()
        return row
    if cell.kind == "teacher":
        return _teacher_row(models, cell, base)
    raise ValueError(f"unknown cell kind {cell.kind!r}")


def _teacher_row(models: BenchModels, cell: Cell, base: RunConfig) -> dict:
    """The cloud model's held-out accuracy on every domain with all tokens: what the teacher knows."""
    import numpy as np

    t0 = time.perf_counter()
    row = {"variant": "teacher", "seed": cell.seed, "uploads": 0, "bytes_up_per_round": 0, "bytes_down_per_round": 0}
    measure_heldout(row, models.teacher, models.teacher_prompter, models.data, resolve_sequence("default"), base.eval.heldout_n,
                    direct=True)
    return {**row, "adapted_mc": row.pop("heldout_mc"), "adapted_da": float(np.mean(list(row["heldout_da"].values()))),
            "wall_s": round(time.perf_counter() - t0, 1)}


def reference_sizes(models: BenchModels, per_domain: int = 64) -> dict:
    """What Table 5 compares against: mean PNG / 224-px JPEG bytes of the stream's shifted frames (the
    first ``per_domain`` stream images of each default domain), adapter entries and device parameters."""
    import numpy as np

    images = split_images(len(models.data.images))[0][:per_domain]
    png, jpeg = [], []
    for dom in resolve_sequence("default"):
        for img in corrupt(models.data.images[images], dom.corruption, dom.severity):
            png.append(len(png_bytes(img)))
            jpeg.append(jpeg224_bytes(img))
    return {"png_bytes": float(np.mean(png)), "jpeg224_bytes": float(np.mean(jpeg)),
            "adapter_entries": sum(v.numel() for v in models.pretrained.values()),
            "device_params": sum(p.numel() for p in models.device.parameters())}


def cell_config(cell: Cell, base: RunConfig) -> dict:
    """Every setting a cell ran with (the loop's, and the baseline's), as JSON: a finished cell whose
    recorded settings differ from today's defaults is stale and runs again."""
    if cell.kind == "teacher":
        return {"heldout_n": base.eval.heldout_n}
    loop, how = loop_config(cell.method if cell.kind == "loop" else "source-only", cell.seed, base, list(cell.settings))
    out = {"loop": {**flatten(loop), **asdict(how)}}
    if cell.kind == "device":

        out["baseline"] = BaselineConfig(method=cell.method).settings()
    return json.loads(json.dumps(out, default=str))


class CellStore:
    """Finished cells as ``OUT/cells/<key>.json``, written atomically: the resume point."""

    def __init__(self, out_dir: Path, base: RunConfig):
        self.dir = Path(out_dir) / "cells"
        self.base = base

    def path(self, cell: Cell) -> Path:
        return self.dir / f"{cell.key(self.base)}.json"

    def get(self, cell: Cell) -> dict | None:
        """The finished row, or None when the cell has not run, is damaged or ran with other settings."""
        p = self.path(cell)
        if not p.is_file():
            return None
        try:
            row = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None            # a damaged cell is simply run again
        return row if row.get("config") == cell_config(cell, self.base) else None

    def put(self, cell: Cell, row: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.path(cell), {**row, "config": cell_config(cell, self.base),
                                     "cell": {"method": cell.method, "kind": cell.kind, "seed": cell.seed,
                                              "settings": list(cell.settings)}})


def run_paper(preset_name: str, base: RunConfig, seeds: list[int], out_dir: Path,
              log: Callable[[str], None] | None = None, link_mbps: float = 10.0, methods: list[str] | None = None) -> dict:
    """Run (or resume) every cell of ``base`` (the run config of preset ``preset_name``, or of ``methods``),
    then build the tables, plots and report in ``out_dir``."""
    p = plan(preset_name, base, seeds, methods)
    store = CellStore(out_dir, base)
    cells = p.cells()
    todo = [c for c in cells if store.get(c) is None]
    if log:
        log(f"{len(cells)} cells, {len(cells) - len(todo)} already done in {store.dir}")
    models = BenchModels.load(base.torch_device)
    t_start = time.perf_counter()
    for i, cell in enumerate(todo, 1):
        t0 = time.perf_counter()
        row = run_cell(cell, models, base)
        store.put(cell, row)
        if log:
            elapsed = time.perf_counter() - t_start
            log(f"[{i}/{len(todo)}] {cell.method} seed {cell.seed} {' '.join(cell.settings)}: MC "
                f"{row['adapted_mc']:.3f} in {time.perf_counter() - t0:.0f} s; ~{elapsed / i * (len(todo) - i) / 60:.0f} min left")
    rows = {c: store.get(c) for c in cells}
    result = build_tables(p, rows, flatten(base), link_mbps, sizes=reference_sizes(models))
    write_outputs(result, Path(out_dir))
    return result
