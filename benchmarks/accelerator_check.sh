#!/usr/bin/env bash
# The cloud on an accelerator, checked in one go (issue 27, part 2): the paper preset's Table 1 for
# source-only and CDCCA, one teacher recipe stage (end-to-end, cloud role) and held-out evaluation of
# the cloud model, each with --torch-device, each timed; timings.json says where the time went.
#
#   benchmarks/accelerator_check.sh [DEVICE]            # DEVICE: cuda (default), cuda:N, mps, cpu
#   CDCCA_TINY=1 benchmarks/accelerator_check.sh cpu    # tiny settings: ~35 s on 2 CPU cores (warm caches)
#   CDCCA_PART=cross benchmarks/accelerator_check.sh    # the cross-family pair instead (docs/MODELS.md): a
#       Gemma-3-270M teacher (opt-in package, Gemma Terms of Use) pretrained beside the shipped device, in
#       bf16 on an accelerator, then Table 1 on it with the teacher's own row; timings-cross.json
#
# Full settings fit in 10 minutes on one GPU (the device's own model stays on the CPU, as a device's
# would: held-out evaluation of the device and its answering run there). Needs cdcca installed with its
# packaged weights and the SmolLM2 cache ($CDCCA_CACHE; `cdcca assets` fetches it), no network after that.
# Output: $CDCCA_CHECK_OUT (default runs/accelerator-check): paper/ (tables.md, report.html), pretrain/,
# eval.json, timings.json. A bad DEVICE fails in one line before anything loads.
set -euo pipefail

DEV="${1:-cuda}"
TINY="${CDCCA_TINY:-0}"
PART="${CDCCA_PART:-shipped}"
OUT="${CDCCA_CHECK_OUT:-runs/accelerator-check}"
CDCCA="${CDCCA:-cdcca}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
rm -rf "$OUT/paper"                                  # cells are resumable: a check always measures afresh

if [ "$TINY" = "1" ]; then
    cat > "$OUT/tiny-preset.toml" <<'EOF'
[uts]
budget = 8                # uploads per round
[eval]
heldout_n = 8             # held-out questions per domain
heldout_da = true
ablation_seeds = 1
EOF
    PAPER=(--config "$OUT/tiny-preset.toml" --rounds-per-domain 1 --round-size 16)
    RECIPE=(--steps 3 --batch-size 4 --aug-share 0)      # clean train tokens only (cached once)
    EVAL=(--n 16 --no-direct)
else
    PAPER=(--preset quick)
    RECIPE=(--steps 100)
    EVAL=(--n 200)
fi
DTYPE=bf16
[ "$DEV" = "cpu" ] && DTYPE=fp32

declare -A WALL
step() {   # step NAME CMD...: run it, keep its wall time
    local name="$1"; shift
    local t0; t0=$(date +%s.%N)
    echo "== $name: $*" >&2
    "$@"
    WALL[$name]=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)")
    echo "== $name: ${WALL[$name]} s" >&2
}

if [ "$PART" = "cross" ]; then
    PAIR="$OUT/gemma-pair"
    mkdir -p "$PAIR"
    cp "$(python3 -c 'import cdcca, pathlib; print(pathlib.Path(cdcca.__file__).parent / "weights")')"/device.* "$PAIR/"
    if [ "$TINY" = "1" ]; then CROSS=(--steps 3 --batch-size 4 --aug-variants 1); else CROSS=(--steps 1000 --batch-size 32 --aug-variants 2); fi
    step cross_teacher "$CDCCA" pretrain --role cloud --set model.cloud.llm=gemma3-270m "${CROSS[@]}" --out "$PAIR" \
        --torch-device "$DEV" > "$OUT/cross-pretrain.json"
    step cross_table1 "$CDCCA" bench paper "${PAPER[@]}" --weights "$PAIR" --seeds 0 --methods source-only,cdcca,teacher \
        --out "$OUT/cross-paper" --torch-device "$DEV" --dtype "$DTYPE" --json > "$OUT/cross-paper.json"
    python3 - "$OUT" "$DEV" "${WALL[cross_teacher]}" "${WALL[cross_table1]}" <<'EOF'
import json, sys
from pathlib import Path

out, dev, teacher_s, table_s = sys.argv[1:]
text = (Path(out) / "cross-pretrain.json").read_text()
pre = json.loads(text[text.index("{"):])
text = (Path(out) / "cross-paper.json").read_text()
paper = json.loads(text[text.index("{"):])
timings = {"torch_device": dev, "wall_s": {"cross_teacher": float(teacher_s), "cross_table1": float(table_s)},
           "teacher_recipe": {k: pre.get(k) for k in ("features_s", "train_s", "s_per_step", "device")},
           "table1": paper["table1"]}
(Path(out) / "timings-cross.json").write_text(json.dumps(timings, indent=2))
print(json.dumps(timings, indent=2))
EOF
    exit 0
fi

step table1 "$CDCCA" bench paper "${PAPER[@]}" --seeds 0 --methods source-only,cdcca --out "$OUT/paper" \
    --torch-device "$DEV" --json > "$OUT/paper.json"
step teacher_recipe "$CDCCA" pretrain --role cloud --recipe end-to-end "${RECIPE[@]}" --out "$OUT/pretrain" --force \
    --torch-device "$DEV" > "$OUT/pretrain.json"
step eval_cloud "$CDCCA" eval --role cloud "${EVAL[@]}" --json --torch-device "$DEV" > "$OUT/eval.json"

python3 - "$OUT" "$DEV" "$TINY" "${WALL[table1]}" "${WALL[teacher_recipe]}" "${WALL[eval_cloud]}" <<'EOF'
import json, sys
from pathlib import Path

out, dev, tiny, *walls = sys.argv[1:]


def doc(name: str) -> dict:
    """The JSON document a command printed (anything a library printed before it is skipped)."""
    text = (Path(out) / name).read_text()
    return json.loads(text[text.index("{"):])


paper = doc("paper.json")
rows = {}
for r in paper["table1"]:                      # per (method, domain): mean over the domains, and each cell's wall time
    rows.setdefault(r["method"], {"mc": [], "online": []})
    for key, col in (("mc", "mc_mean"), ("online", "online_mean")):
        if r.get(col) is not None:
            rows[r["method"]][key].append(r[col])
rows = {m: {f"{k}_mean_over_domains": round(sum(v[k]) / len(v[k]), 4) if v[k] else None for k in ("mc", "online")}
        for m, v in rows.items()}
for cell in sorted((Path(out) / "paper" / "cells").glob("*.json")):
    row = json.loads(cell.read_text())
    rows.setdefault(row.get("variant", cell.stem), {})["cell_wall_s"] = row.get("wall_s")
pre = doc("pretrain.json")
timings = {"torch_device": dev, "tiny": tiny == "1",
           "wall_s": dict(zip(("table1", "teacher_recipe", "eval_cloud"), map(float, walls))),
           "teacher_recipe": {"steps": pre.get("config", {}).get("steps"),
                              **{k: pre.get(k) for k in ("features_s", "train_s", "s_per_step", "device")}},
           "eval_cloud": json.loads((Path(out) / "eval.json").read_text().strip().splitlines()[-1]),   # one line
           "table1": rows}
(Path(out) / "timings.json").write_text(json.dumps(timings, indent=2))
print(json.dumps(timings, indent=2))
EOF
echo "tables: $OUT/paper/tables.md" >&2
