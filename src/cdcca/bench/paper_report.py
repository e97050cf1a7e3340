"""The tables, plots, Markdown and report.html of ``cdcca bench paper``, rebuilt from its cells.

Means and spreads are over seeds (std with ddof 0; 0 where one seed ran). Differences between
methods are paired per seed (same stream questions), then averaged. The claims section is written
from the numbers, so it cannot disagree with the tables.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from cdcca.atomic import write_json
from cdcca.bench.report import PAGE_STYLE, embed_png, pyplot
from cdcca.data.scenario import after_shift, recovery_curve

TOKEN_FP16_BYTES = 49 * 1280 * 2       # one request's full visual tokens in fp16
# the device-only baselines of Table 1 (the plan in cdcca.bench.paper runs them; the claims compare with them)
DEVICE_ONLY = ("bn", "tent", "tent+bn", "eata", "cotta")
RESULTS_BEGIN, RESULTS_END = "<!-- bench-paper:begin -->", "<!-- bench-paper:end -->"


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)


def online_of(run: dict, domain: str | None = None) -> float | None:
    """A run's online MC: over every shifted round (``domain`` None) or over the rounds of one domain."""
    pairs = [(v, d) for v, d in zip(run.get("online_per_round") or [], run.get("domains") or []) if d != "clean"]
    vals = [v for v, d in pairs if domain is None or d == domain]
    return float(np.mean(vals)) if vals else None


def table1_rows(cells: dict[str, list[dict]]) -> list[dict]:
    """Per method and domain (each shifted domain, "mean" over them, "clean"): held-out MC and DA after the
    stream, and online MC (the answers served while streaming), mean and std over seeds."""
    rows = []
    for method, runs in cells.items():
        domains = list(runs[0]["heldout"])
        for dom in [*domains, "mean", "clean"]:
            if dom == "mean":
                mc = [r["adapted_mc"] for r in runs]
                da = [r.get("adapted_da") for r in runs]
                online = [online_of(r) for r in runs]
            elif dom == "clean":
                mc = [r["source_mc"] for r in runs]
                da = [r.get("source_da") for r in runs]
                online = [None]
            else:
                mc = [r["heldout"][dom] for r in runs]
                da = [(r.get("heldout_da") or {}).get(dom) for r in runs]
                online = [online_of(r, dom) for r in runs]
            (mc_m, mc_s), (da_m, da_s), (on_m, on_s) = _stats(mc), _stats(da), _stats(online)
            row = {"method": method, "domain": dom, "mc_mean": mc_m, "mc_std": mc_s, "da_mean": da_m,
                   "da_std": da_s, "online_mean": on_m, "online_std": on_s, "n_seeds": len(runs)}
            if dom == "mean":
                row.update({k: float(np.mean([r.get(k, 0) for r in runs])) for k in ("bytes_up_per_round", "bytes_down_per_round")})
                row["first80_mean"], row["first80_std"] = _stats([(r.get("after_shift") or {}).get("first_80") for r in runs])
                reference = {r["seed"]: r for r in cells.get("source-only", [])}
                row["requests_to_half_mean"], _ = _stats([requests_to_half_of(r, reference.get(r["seed"])) for r in runs])
            rows.append(row)
    return rows


def requests_to_half_of(run: dict, reference: dict | None) -> float | None:
    """Requests after a shift until ``run`` first gains half of its final gain over the never-updated device
    (``reference``: the source-only run of the same seed, which answered the same requests)."""
    if reference is None or run is reference or not run.get("correct_per_round") or not reference.get("correct_per_round"):
        return None
    rows = [{"round": i, "domain": d, "step": s, "correct": c, "reference": rc} for i, (d, s, c, rc) in enumerate(
        zip(run["domains"], run["steps"], run["correct_per_round"], reference["correct_per_round"]))]
    return (after_shift(rows, reference="reference") or {}).get("requests_to_half")


def paired_gain(a: list[dict], b: list[dict], online: bool = False) -> tuple[float, float, int] | None:
    """Mean ± std over shared seeds of a's shifted-domain MC minus b's, in points (``online``: the
    online MC of the answers served, else held-out MC after the stream)."""
    def value(r: dict) -> float | None:
        return online_of(r) if online else r["adapted_mc"]

    bs = {r["seed"]: value(r) for r in b}
    diffs = [100 * (value(r) - bs[r["seed"]]) for r in a if r["seed"] in bs and value(r) is not None and bs[r["seed"]] is not None]
    if not diffs and len(b) == 1 and value(b[0]) is not None:     # a seed-independent row (the teacher)
        diffs = [100 * (value(r) - value(b[0])) for r in a if value(r) is not None]
    return (float(np.mean(diffs)), float(np.std(diffs)), len(diffs)) if diffs else None


def recovery_of(run: dict) -> list[float]:
    """A run's online MC per round of a domain (1st, 2nd, …), averaged over the domains' visits."""

    rows = [{"online_mc": v, "domain": d, "step": st} for v, d, st in
            zip(run.get("online_per_round") or [], run.get("domains") or [], run.get("steps") or [])]
    return recovery_curve(rows)


def ablation_rows(groups: dict, label_key: str) -> list[dict]:
    rows = []
    for label, runs in groups.items():
        (mc_m, mc_s), (da_m, _), (cl, _) = (_stats([r["adapted_mc"] for r in runs]),
                                            _stats([r.get("adapted_da") for r in runs]),
                                            _stats([r["source_mc"] for r in runs]))
        rows.append({label_key: label, "variant": runs[0]["variant"], "mc_mean": mc_m, "mc_std": mc_s, "da_mean": da_m,
                     "clean_mc": cl, "bytes_up_per_round": float(np.mean([r["bytes_up_per_round"] for r in runs])),
                     "bytes_down_per_round": float(np.mean([r["bytes_down_per_round"] for r in runs])),
                     "n_seeds": len(runs)})
    return rows


def table5_rows(cdcca: list[dict], dense: list[dict], sizes: dict, link_mbps: float) -> list[dict]:
    """Bytes per round on each link and their transfer time, against raw frames and the full model."""
    rounds = len(cdcca[0]["online_per_round"])
    uploads = float(np.mean([r["uploads"] for r in cdcca])) / rounds
    up = float(np.mean([r["bytes_up_per_round"] for r in cdcca]))
    down = float(np.mean([r["bytes_down_per_round"] for r in cdcca]))
    entries = [
        ("uplink", "cdcca: kept tokens of the uploads (int8)", up),
        ("uplink", "all tokens of the same uploads (fp16)", uploads * TOKEN_FP16_BYTES),
        ("uplink", "raw frames of the same uploads (64×64 PNG of the shifted image)", uploads * sizes["png_bytes"]),
        ("uplink", "raw frames of the same uploads (224×224 JPEG q90)", uploads * sizes["jpeg224_bytes"]),
        ("downlink", "cdcca: DWC update", down),
        ("downlink", "dense adapter state (fp32, cdcca-dense)", float(np.mean([r["bytes_down_per_round"] for r in dense]))),
        ("downlink", "adapter delta, every entry (fp16)", sizes["adapter_entries"] * 2),
        ("downlink", "the whole device model (fp16)", sizes["device_params"] * 2),
    ]
    base = {"uplink": up, "downlink": down}
    return [{"link": link, "what": what, "bytes_per_round": round(b), "x_cdcca": round(b / base[link], 2),
             "seconds_at_link": round(b * 8 / (link_mbps * 1e6), 4), "link_mbps": link_mbps} for link, what, b in entries]


def build_tables(plan, rows: dict, settings: dict, link_mbps: float, sizes: dict | None = None) -> dict:
    """Every table, the per-round online curves and the generated claims, as one JSON-able dict."""
    t1 = {m: [rows[c] for c in cells] for m, cells in plan.table1.items()}
    t3 = {label: [rows[c] for c in cells] for label, cells in plan.table3.items()}
    t4 = {str(k): [rows[c] for c in cells] for k, cells in plan.table4.items()}
    online = {m: np.mean([r["online_per_round"] for r in runs], axis=0).tolist()
              for m, runs in t1.items() if runs[0].get("online_per_round")}
    recovery = {m: np.mean([recovery_of(r) for r in runs], axis=0).tolist()
                for m, runs in t1.items() if runs[0].get("steps")}
    streamed = next((runs for runs in t1.values() if runs[0].get("domains")), None)
    domains = streamed[0]["domains"] if streamed else list(next(iter(t1.values()))[0]["heldout"])  # e.g. the teacher alone
    result = {"preset": plan.preset, "seeds": plan.seeds, "settings": settings, "table1": table1_rows(t1),
              "table3": ablation_rows(t3, "ablation"), "table4": ablation_rows(t4, "keep_ratio"),
              "online_per_round": online, "recovery": recovery, "domains": domains}
    result["table5"] = (table5_rows(t1["cdcca"], t1["cdcca-dense"], sizes, link_mbps)
                        if sizes and "cdcca" in t1 and "cdcca-dense" in t1 else [])
    if "cdcca" in t1:
        result["gains"] = {m: paired_gain(t1["cdcca"], runs) for m, runs in t1.items() if m != "cdcca"}
        result["online_gains"] = {m: paired_gain(t1["cdcca"], runs, online=True) for m, runs in t1.items() if m != "cdcca"}
    else:
        result["gains"], result["online_gains"] = {}, {}
    result["claims"] = claims(result, t1, t3)
    return result


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def claims(result: dict, t1: dict, t3: dict) -> list[dict]:
    """The paper's claims, each with this benchmark's number and whether it holds here."""
    g, og = result["gains"], result["online_gains"]
    out = []
    for m in ("source-only", *DEVICE_ONLY):
        if og.get(m):
            d, s, n = og[m]
            out.append({"claim": f"CDCCA beats {m} on online MC (the answers users got)",
                        "value": f"{d:+.1f} ± {s:.1f} points ({_seeds(n)})", "holds": d > 0 and d > s})
        if g.get(m):
            d, s, n = g[m]
            out.append({"claim": f"CDCCA beats {m} on the shifted-domain mean held-out MC", "value": f"{d:+.1f} ± {s:.1f} points ({_seeds(n)})",
                        "holds": d > 0 and d > s})
    ran = [m for m in DEVICE_ONLY if m in t1 and og.get(m)]
    if ran:
        best = max(ran, key=lambda m: np.mean([online_of(r) for r in t1[m]]))
        d, s, n = og[best]
        out.append({"claim": "paper: +3.64 MC over the best baseline (online MC here)", "value": f"{d:+.1f} ± {s:.1f} over {best}",
                    "holds": d >= 3.64})
    if "CE + MSE + wavelet + KD (paper's AKD)" not in t3:
        return out
    ce = paired_gain(t3["CE + MSE + wavelet + KD (paper's AKD)"], t3["CE (pseudo-labels alone)"])
    if ce:
        out.append({"claim": "paper: AKD's feature losses add +2.53 MC over pseudo-labels alone",
                    "value": f"{ce[0]:+.1f} ± {ce[1]:.1f} (full AKD loss − CE only, {_seeds(ce[2])})", "holds": ce[0] >= 2.53})
    t4 = {r["keep_ratio"]: r["mc_mean"] for r in result["table4"]}
    if not t4:
        return out
    best_keep = max(t4, key=t4.get)
    out.append({"claim": "paper: keeping 50 % of the tokens is best", "value": f"best keep ratio here {best_keep}",
                "holds": float(best_keep) == 0.5})
    return out


# -- rendering -------------------------------------------------------------------------------
def _pm(m, s, scale: float = 100.0) -> str:
    return "–" if m is None else f"{scale * m:.1f} ± {scale * s:.1f}"


def markdown(result: dict) -> str:
    """All four tables and the claims as Markdown."""
    doms = list(dict.fromkeys(d for d in result["domains"] if d != "clean"))
    t1 = {(r["method"], r["domain"]): r for r in result["table1"]}
    methods = list(dict.fromkeys(r["method"] for r in result["table1"]))
    lines = [f"Preset `{result['preset']}`, seeds {', '.join(map(str, result['seeds']))}, scenario "
             f"`{(result['settings'] or {}).get('stream.scenario', 'persistent')}`: online MC (the answers served while the stream ran) "
             "and held-out MC / DA (%) after the whole stream, mean ± std over seeds.", "",
             "**Table 1.** Methods × shifted domains: online MC per domain and over the stream, held-out MC "
             "(mean over domains) and DA, clean MC (forgetting check).", "",
             "| method | " + " | ".join(f"online {d}" for d in doms) + " | **online MC** | first 80 after a shift | "
             "requests to half the gain | held-out MC | held-out DA | clean MC | seeds |",
             "|---|" + "---|" * (len(doms) + 7)]
    for m in methods:
        cells = [_pm(t1[(m, d)]["online_mean"], t1[(m, d)]["online_std"]) for d in doms]
        mean, clean = t1[(m, "mean")], t1[(m, "clean")]
        half = mean.get("requests_to_half_mean")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | **{_pm(mean['online_mean'], mean['online_std'])}** | "
                     f"{_pm(mean.get('first80_mean'), mean.get('first80_std'))} | {'–' if half is None else f'{half:.0f}'} | "
                     f"{_pm(mean['mc_mean'], mean['mc_std'])} | {_pm(mean['da_mean'], mean['da_std'])} | "
                     f"{_pm(clean['mc_mean'], clean['mc_std'])} | {mean['n_seeds']} |")
    if result.get("recovery"):
        steps = max(len(v) for v in result["recovery"].values())
        lines += ["", "**Recovery.** Online MC in the 1st, 2nd, … round of a domain (mean over domains and seeds).", "",
                  "| method | " + " | ".join(f"round {i + 1}" for i in range(steps)) + " |", "|---|" + "---|" * steps]
        lines += [f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in ys) + " |" for m, ys in result["recovery"].items()]
    if not result["table3"]:
        return _tail(lines, result)
    lines += ["", "**Table 3.** AKD loss ablation (the paper's label-phase AKD, dense downlink) and the shipped AKD.", "",
              "| loss | mean MC | mean DA | clean MC | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {r['ablation']} | {_pm(r['mc_mean'], r['mc_std'])} | {_pm(r['da_mean'], 0.0).split(' ±')[0]} | "
              f"{100 * r['clean_mc']:.1f} | {r['n_seeds']} |" for r in result["table3"]]
    lines += ["", "**Table 4.** Token keep ratio of the uplink (the shipped pipeline).", "",
              "| keep ratio | mean MC | uplink KiB / round | seeds |", "|---|---|---|---|"]
    lines += [f"| {r['keep_ratio']} | {_pm(r['mc_mean'], r['mc_std'])} | {r['bytes_up_per_round'] / 1024:.1f} | {r['n_seeds']} |"
              for r in result["table4"]]
    return _tail(lines, result)


def _tail(lines: list[str], result: dict) -> str:
    """Table 5 (when it ran) and the claims, closing :func:`markdown`."""
    if result["table5"]:
        mbps = result["table5"][0]["link_mbps"]
        lines += ["", f"**Table 5.** Bytes per round and transfer time at {mbps:g} Mbit/s.", "",
                  "| link | what | bytes / round | × cdcca | seconds |", "|---|---|---|---|---|"]
        lines += [f"| {r['link']} | {r['what']} | {r['bytes_per_round']:,} | {r['x_cdcca']:g} | {r['seconds_at_link']:g} |"
                  for r in result["table5"]]
    lines += ["", "**Claims.**", "", "| claim | here | holds |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['value']} | {'yes' if c['holds'] else '**no**'} |" for c in result["claims"]]
    return "\n".join(lines) + "\n"


def plot_online(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    for i, (m, ys) in enumerate(result["online_per_round"].items()):
        bold = m == "cdcca"
        ax.plot(range(len(ys)), ys, marker="os^vD"[i % 5], color="black" if bold else colours[i % len(colours)],
                lw=2.6 if bold else 1.2, ls="-" if m in ("cdcca", "source-only") or i % 2 else "--", label=m)
    ticks = [i for i, d in enumerate(result["domains"]) if i == 0 or result["domains"][i - 1] != d]
    ax.set_xticks(ticks, [result["domains"][i] for i in ticks], fontsize=7)
    ax.set_ylabel("online MC accuracy (answers users got)")
    ax.set_title("Online accuracy per round per method (mean over seeds); a cloud update lands after its round", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_downlink(result: dict, path: Path, cells: dict) -> None:
    """Shifted-domain mean MC against downlink bytes per round (0 bytes drawn at 1 B on the log axis)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colours = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    for i, (m, (x, y)) in enumerate(cells.items()):
        ax.scatter([max(x, 1)], [y], color=colours[i % len(colours)], marker="os^vD"[i % 5], s=60 if m == "cdcca" else 30, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("downlink bytes per round (device-only methods drawn at 1: nothing is sent)")
    ax.set_ylabel("shifted-domain mean MC")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _html_from_markdown(md: str) -> str:
    """The tables.md subset used here (paragraphs, pipe tables, **bold**) as HTML."""
    import re

    out, table = [], []

    def inline(text: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", re.sub(r"`(.+?)`", r"<code>\1</code>", html.escape(text)))

    def flush() -> None:
        if table:
            head, body = table[0], [r for r in table[2:]]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


def write_outputs(result: dict, out_dir: Path) -> None:
    """paper.json, tables.md, online.png, downlink.png and a self-contained report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "paper.json", result)
    md = markdown(result)
    (out_dir / "tables.md").write_text(md)
    plot_online(result, out_dir / "online.png")
    points = {r["method"]: (r["bytes_down_per_round"], r["mc_mean"]) for r in result["table1"]
              if r["domain"] == "mean" and r.get("bytes_down_per_round") is not None and r["method"] != "teacher"}
    plot_downlink(result, out_dir / "downlink.png", points)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>cdcca: the paper's tables</title>{PAGE_STYLE}</head><body>
<h1>cdcca against the baselines: the paper's tables on this benchmark</h1>
{_html_from_markdown(md)}
<h2>Accuracy per round per method</h2>{embed_png(out_dir / "online.png", "online accuracy per round per method")}
<h2>Accuracy against downlink bytes</h2>{embed_png(out_dir / "downlink.png", "accuracy against downlink bytes")}
<p class="note">Raw numbers: paper.json; every run: cells/*.json next to this page.</p>
</body></html>"""
    (out_dir / "report.html").write_text(doc)


def update_results_page(page: Path, md: str) -> None:
    """Replace the generated block of a docs page (between the bench-paper markers) with ``md``."""
    text = page.read_text()
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise ValueError(f"{page} has no {RESULTS_BEGIN} … {RESULTS_END} block to fill; add the two markers where the tables go")
    head, rest = text.split(RESULTS_BEGIN, 1)
    _, tail = rest.split(RESULTS_END, 1)
    page.write_text(f"{head}{RESULTS_BEGIN}\n{md}{RESULTS_END}{tail}")
