"""Run outputs: metrics.json, PNG plots and a self-contained report.html that reads like a results page.

The page opens with one sentence a person can act on (from what to what, at which cost), then
source-only, adapted, teacher and oracle side by side per domain, the per-domain held-out curves
over rounds (does adapting to one shift forget another?), the online accuracy users saw, the bytes
per round, the settings and the per-round table. Everything is embedded: the file opens offline.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from cdcca.atomic import write_json

PAGE_STYLE = """<style>body{font-family:system-ui,-apple-system,sans-serif;margin:2em auto;max-width:62em;color:#222;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.8em;border-bottom:1px solid #ddd}
p.lead{font-size:1.15em;background:#f3f7fb;border-left:4px solid #1f77b4;padding:.7em 1em}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:right}
th{background:#fafafa} td:first-child,th:first-child,td.l{text-align:left} tr.mean td{font-weight:600}
tr.clean td{color:#555} img{max-width:100%;display:block;margin:.6em 0} .note{color:#666;font-size:.9em}</style>"""

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def embed_png(path: Path, alt: str) -> str:
    """An <img> with the PNG inline, so the page opens offline and travels as one file."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _first_device_rounds(rounds: list[dict]) -> list[dict]:
    """The rows of the device whose held-out accuracy is measured (the first one)."""
    measured = [r for r in rounds if r.get("heldout")]
    dev = measured[0]["device"] if measured else (rounds[0]["device"] if rounds else None)
    return [r for r in rounds if r["device"] == dev]


def plot_domains(rounds: list[dict], summary: dict, path: Path) -> None:
    """Held-out MC per domain after every round (solid), source-only per domain (dashed), clean (black)."""
    plt = pyplot()
    rs = [r for r in _first_device_rounds(rounds) if r.get("heldout")]
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    base = summary.get("source_only", {})
    for i, dom in enumerate([d for d in summary.get("domains") or (rs[0]["heldout"] if rs else {})
                             if rs and d in rs[0]["heldout"]]):     # stream order
        c = COLOURS[i % len(COLOURS)]
        xs = [-1] + [r["round"] for r in rs]
        ys = [base.get(dom)] + [r["heldout"][dom] for r in rs]
        ax.plot(xs, ys, marker="o", color=c, label=dom)
        if dom in base:
            ax.axhline(base[dom], color=c, ls="--", lw=0.8, alpha=0.6)
    if summary.get("source_mc_before") is not None:
        ax.plot([-1] + [r["round"] for r in rs], [summary["source_mc_before"]] + [r["source_mc"] for r in rs],
                marker="s", color="black", label="clean (forgetting check)")
    labels = ["before"] + [f"{r['round']}\n{r['domain']}" for r in rs]
    ax.set_xticks([-1] + [r["round"] for r in rs], labels, fontsize=7)
    ax.set_ylabel("held-out MC accuracy")
    ax.set_title("Held-out accuracy per domain after each round (dashed: source-only)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: never hides a curve
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_online(rounds: list[dict], summary: dict, path: Path) -> None:
    """Online MC (the answers users got, before that round's update) against source-only on the same domain."""
    plt = pyplot()
    rs = _first_device_rounds(rounds)
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    xs = [r["round"] for r in rs]
    ax.plot(xs, [r["online_mc"] for r in rs], marker="o", label="adapted device, online (as users saw it)")
    if any(r.get("source_only_online_mc") is not None for r in rs):
        ax.plot(xs, [r.get("source_only_online_mc") for r in rs], marker="x", ls="--", color="gray",
                label="never-updated device, same requests")
    ax.set_xticks(xs, [f"{r['round']}\n{_short(r['domain'])}" if r.get("step", 0) == 0 else str(r["round"]) for r in rs],
                  fontsize=7)
    ax.set_ylabel("online MC accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(domain: str) -> str:
    return Path(domain).stem if domain.endswith(".jsonl") else domain


def plot_recovery(summary: dict, path: Path) -> None:
    """Online MC in the 1st, 2nd, … round after a shift (mean over domains), adapted vs never-updated."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    for key, label, style in (("recovery", "adapted device", dict(marker="o")),
                              ("source_only_recovery", "never-updated device", dict(marker="x", ls="--", color="gray"))):
        ys = summary.get(key) or []
        ax.plot(range(1, len(ys) + 1), ys, label=label, **style)
    ax.set_xlabel("round of a domain (1 = right after the shift; its update lands before round 2)")
    ax.set_ylabel("online MC accuracy")
    ax.set_xticks(range(1, len(summary.get("recovery") or []) + 1))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(rounds: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    xs = sorted({r["round"] for r in rounds})
    up = [sum(r["bytes_up"] for r in rounds if r["round"] == x) / 1024 for x in xs]
    down = [sum(r["bytes_down"] for r in rounds if r["round"] == x) / 1024 for x in xs]
    ax.bar([x - 0.2 for x in xs], up, width=0.4, label="uplink KiB")
    ax.bar([x + 0.2 for x in xs], down, width=0.4, label="downlink KiB")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("round")
    ax.set_ylabel("KiB (all devices)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _pts(a, b) -> str:
    return "–" if a is None or b is None else f"{100 * (a - b):+.1f}"


def recovery_words(summary: dict) -> str:
    """The online gain over the never-updated device in each round of a domain, and when it holds."""
    ad, so = summary.get("recovery") or [], summary.get("source_only_recovery") or []
    gains = [a - b for a, b in zip(ad, so)]
    if not gains:
        return ""
    curve = " / ".join(f"{100 * g:+.1f}" for g in gains)
    settled = next((i + 1 for i, g in enumerate(gains) if g >= 0.5 * max(gains) and g > 0.02), None)
    when = (f"the gain reached half its best by round {settled} of a domain" if settled
            else "the device did not recover")
    first = _after_shift_words(summary)
    return f"after each shift {when} (online gain per round of a domain: {curve} points{first})"


def _after_shift_words(summary: dict) -> str:
    """The first 80 answers after a shift against the never-updated device's, and the requests to half the gain."""
    ad, so = summary.get("after_shift") or {}, summary.get("source_only_after_shift") or {}
    if ad.get("first_80") is None or so.get("first_80") is None:
        return ""
    half = ad.get("requests_to_half")
    return (f"; the first 80 requests after a shift {_pts(ad['first_80'], so['first_80'])} points"
            f"{'' if half is None else f', half the gain after {half:.0f} requests'}")


def headline(summary: dict) -> str:
    """One sentence: what users got, then held-out accuracy and forgetting, then what it cost."""
    rounds = max(1, summary.get("rounds", 1))
    up = summary.get("bytes_up_total", 0) / rounds / 1024
    down = summary.get("bytes_down_total", 0) / rounds / 1024
    so, ad = summary.get("source_only_mc"), summary.get("adapted_mc")
    if so is None or ad is None or so != so:
        return (f"The loop ran {rounds} rounds end to end ({up:.0f} KiB up and {down:.0f} KiB down per round); "
                "accuracy is not measured in this mode.")
    kept = ""
    if summary.get("source_mc_before") is not None and summary.get("source_mc_after") is not None:
        kept = f", clean accuracy {_pct(summary['source_mc_before'])} → {_pct(summary['source_mc_after'])}"
    online = ""
    if summary.get("online_mc") is not None:
        online = (f"Users got {_pct(summary['online_mc'])} right answers instead of {_pct(summary['source_only_online_mc'])} "
                  f"({_pts(summary['online_mc'], summary['source_only_online_mc'])} points) on the shifted stream"
                  f"{'; ' + recovery_words(summary) if summary.get('recovery') else ''}. ")
    return (f"{online}Held-out accuracy after the stream: {_pct(so)} (never updated) → {_pct(ad)} "
            f"({_pts(ad, so)} points){kept}; {up:.0f} KiB up and {down:.0f} KiB down per round{_fleet_words(summary)}. "
            f"Stream: {html.escape(' → '.join(_short(d) for d in summary.get('domains') or [summary.get('stream', '')]))}.")


def _fleet_words(summary: dict) -> str:
    n = summary.get("devices", 1) or 1
    if n == 1:
        return ""
    shared = "one fleet group sharing one student" if summary.get("group") else "a student each"
    return f" for all {n} devices ({shared}; accuracy measured on dev-0)"


def _comparison_table(summary: dict) -> str:
    cols = [("source-only", summary.get("source_only", {})), ("adapted (cdcca)", summary.get("adapted", {})),
            ("cloud teacher", summary.get("teacher", {})), ("oracle (true labels)", summary.get("oracle", {}))]
    cols = [(name, vals) for name, vals in cols if vals]
    domains = summary.get("domains") or [d for d in summary.get("source_only", {}) if d != "clean"]
    head = "<tr><th>domain</th>" + "".join(f"<th>{html.escape(n)}</th>" for n, _ in cols) + "</tr>"
    body = ""
    for d in domains + ["mean of shifted"]:
        cells = []
        for _, vals in cols:
            v = vals.get(d)
            if d == "mean of shifted":
                shifted = [vals[k] for k in domains if k in vals]
                v = sum(shifted) / len(shifted) if shifted else None
            cells.append(f"<td>{_pct(v)}</td>")
        style = ' class="mean"' if d == "mean of shifted" else ""
        body += f"<tr{style}><td>{html.escape(d)}</td>{''.join(cells)}</tr>"
    clean = "".join(f"<td>{_pct(v.get('clean'))}</td>" for _, v in cols)
    return f"<table>{head}{body}<tr class='clean'><td>clean (source domain)</td>{clean}</tr></table>"


def _rounds_table(rounds: list[dict]) -> str:
    cols = [("round", "round"), ("device", "device"), ("domain", "domain"), ("online MC", "online_mc"),
            ("never-updated online MC", "source_only_online_mc"),
            ("held-out MC", "heldout_mc"), ("clean MC", "source_mc"), ("uploads", "uploads"),
            ("up KiB", "bytes_up"), ("down KiB", "bytes_down"), ("cloud s", "cloud_s")]

    def cell(key, v):
        if v is None or v == "":
            return "–"
        if key in ("bytes_up", "bytes_down"):
            return f"{v / 1024:.1f}"
        if isinstance(v, float):
            return f"{v:.3f}" if key.endswith("mc") else f"{v:.1f}"
        return html.escape(str(v))

    head = "".join(f"<th>{n}</th>" for n, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(k, r.get(k))}</td>" for _, k in cols) + "</tr>" for r in rounds)
    return f"<table><tr>{head}</tr>{body}</table>"


def _settings_table(settings: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td class='l'>{html.escape(str(v))}</td></tr>"
                   for k, v in settings.items())
    return f"<table class='settings'>{rows}</table>"


def _timing_note(summary: dict) -> str:
    t = summary.get("timing")
    if not t:
        return ""
    parts = [("cloud AKD → DWC", "cloud_s"), ("devices serving", "devices_s"), ("held-out evaluation", "heldout_eval_s"),
             ("references", "references_s"), ("setup", "setup_s"), ("oracle", "oracle_s")]
    return ": " + ", ".join(f"{name} {t[k]:.0f} s" for name, k in parts if t.get(k))


def write_report(out_dir: Path, metrics: dict) -> None:
    """metrics.json, domains.png, online.png, bytes.png and report.html (images embedded) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    rounds, summary = metrics["rounds"], metrics["summary"]
    plots = {"domains.png": plot_domains, "online.png": plot_online}
    for name, fn in plots.items():
        fn(rounds, summary, out_dir / name)
    plot_bytes(rounds, out_dir / "bytes.png")
    if summary.get("recovery"):
        plot_recovery(summary, out_dir / "recovery.png")

    def img(name: str, alt: str) -> str:
        return embed_png(out_dir / name, alt)

    measured = bool(summary.get("source_only"))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>cdcca: continual adaptation run</title>
{PAGE_STYLE}
</head><body>
<h1>cdcca: cloud-device continual adaptation</h1>
<p class="lead">{headline(summary)}</p>
{'<h2>Accuracy on held-out questions, side by side</h2>' + _comparison_table(summary) +
 '<p class="note">Held-out questions on images the device never streamed. Source-only: the pretrained device, never '
 'updated. Adapted: the same device after the last round. Cloud teacher: the large model itself, on the full '
 'token set. Oracle: the same uploads trained on their true labels (the most any teacher could pass on with '
 'this data), when it was run.</p>' if measured else ''}
{'<h2>Per-domain accuracy over rounds</h2>' + img('domains.png', 'held-out accuracy per domain over rounds') if measured else ''}
<h2>Online accuracy, as users saw it</h2>{img('online.png', 'online accuracy per round')}
{'<h2>Recovery after a shift</h2>' + img('recovery.png', 'online accuracy per round of a domain') if summary.get('recovery') else ''}
<h2>Bytes on the link</h2>{img('bytes.png', 'bytes per round')}
<h2>Settings</h2>{_settings_table(summary.get('settings', {}))}
<h2>Every round</h2>{_rounds_table(rounds)}
<p class="note">Raw numbers: metrics.json next to this page. Wall time {summary.get('wall_s', 0):.0f} s{_timing_note(summary)}.</p>
</body></html>"""
    (out_dir / "report.html").write_text(doc)
