"""Run outputs: metrics.json, PNG plots and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from cdcca.assets import write_json


def plot_accuracy(rounds: list[dict], source_only: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for dev in sorted({r["device"] for r in rounds}):
        rs = [r for r in rounds if r["device"] == dev]
        held = [r for r in rs if r.get("heldout_mc") is not None]
        if held:
            ax.plot([r["round"] for r in held], [r["heldout_mc"] for r in held], marker="o", label=f"{dev} adapted (held-out)")
        ax.plot([r["round"] for r in rs], [r["online_mc"] for r in rs], ls=":", marker=".", label=f"{dev} online")
    ax.axhline(source_only, color="gray", ls="--", label="source-only (held-out)")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("MC accuracy, shifted domains")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(rounds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    xs = sorted({r["round"] for r in rounds})
    up = [sum(r["bytes_up"] for r in rounds if r["round"] == x) / 1024 for x in xs]
    down = [sum(r["bytes_down"] for r in rounds if r["round"] == x) / 1024 for x in xs]
    ax.bar([x - 0.2 for x in xs], up, width=0.4, label="uplink KiB")
    ax.bar([x + 0.2 for x in xs], down, width=0.4, label="downlink KiB")
    ax.set_xlabel("round")
    ax.set_ylabel("KiB (all devices)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, metrics: dict) -> None:
    """metrics.json, accuracy.png, bytes.png and report.html (images embedded) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    rounds, summary = metrics["rounds"], metrics["summary"]
    plot_accuracy(rounds, summary["source_only_mc"], out_dir / "accuracy.png")
    plot_bytes(rounds, out_dir / "bytes.png")
    cols = ["round", "device", "domain", "online_mc", "heldout_mc", "source_mc", "uploads", "bytes_up", "bytes_down"]

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    table = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rounds)
    imgs = "".join(f'<img alt="{n}" src="data:image/png;base64,{base64.b64encode((out_dir / n).read_bytes()).decode()}">'
                   for n in ("accuracy.png", "bytes.png"))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>cdcca run</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}}
img{{max-width:100%;display:block;margin:1em 0}}pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>cdcca: continual adaptation run</h1>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>{imgs}
<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{table}</table></body></html>"""
    (out_dir / "report.html").write_text(doc)
