"""``cdcca bench uts|akd|dwc``: thin wrappers that print JSON and a table; the logic is in :mod:`cdcca.bench`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from cdcca.assets import AssetError
from cdcca.cli.common import (
    ConfigOpt,
    DtypeOpt,
    PresetOpt,
    RoundSizeOpt,
    RoundsPerDomainOpt,
    ScenarioOpt,
    SetOpt,
    StreamOpt,
    TorchDeviceOpt,
    UpdateDelayOpt,
    VisitsOpt,
    WeightsOpt,
    console,
    fail,
    one_line_errors,
    run_config,
    torch_device_or_fail,
    use_threads,
)
from cdcca.cli.live import bench_live

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON and a table.")
bench_app.command("live")(bench_live)


@bench_app.command("uts")
def bench_uts(
    n: int = typer.Option(400, help="Stream requests over the default shift sequence."),
    repeats: int = typer.Option(5, help="Timing repeats (medians are reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int | None = typer.Option(1, help="torch CPU threads (default 1: answer and UTS timed alike)."),
    codes: str | None = typer.Option(None, help="Comma-separated token codes to compare on the uploads, e.g. "
                                     "full-int8,pca128-int4,pca256-ec (default: full-int8 and five pca variants)."),
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    weights: WeightsOpt = None,
    torch_device: TorchDeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """UTS on the default shift stream: scorer AUROC, uplink bytes and ratios, and scoring overhead; the
    default upload is the run config's `uts` section."""
    from cdcca.bench.uts import run_bench  # heavy: imported when the command runs, not for --help

    cfg = run_config(preset, config, set_, torch_device=torch_device, weights=weights, dtype=dtype)
    torch_device = cfg.torch_device
    if n < 4:
        fail(f"--n must be at least 4 (one request per domain), got {n}")
    from cdcca.uplink import parse_code  # heavy: imported when the command runs, not for --help

    try:
        code_list = None if codes is None else [parse_code(c.strip()).name for c in codes.split(",") if c.strip()]
    except ValueError as exc:
        fail(f"--codes: {exc}")
    use_threads(threads)
    try:
        res = run_bench(n, cfg=cfg.uts, repeats=repeats, log=None if as_json else console.print, torch_device=torch_device,
                        **({} if code_list is None else {"codes": code_list}))
    except AssetError as exc:
        fail(str(exc))
    if not as_json:
        table = Table(title=f"UTS on {', '.join(res['domains'])} ({res['n']} requests, {res['model']})")
        table.add_column("measure")
        table.add_column("value")
        for name, value in res["auroc"].items():
            table.add_row(f"AUROC {name}" + (" (best)" if name == res["best_sample_scorer"] else ""), f"{value:.3f}")
        d = res["default"]
        table.add_row("upload rate (default)", f"{d['upload_rate']:.3f} ({d['uploaded']} samples)")
        table.add_row(f"bytes / uploaded sample ({d['token_code']})", f"{d['bytes_per_uploaded_sample']:.0f}")
        for key in ("png_64_bytes", "jpeg_64_bytes", "png_224_bytes", "jpeg_224_bytes"):
            table.add_row(f"same frame, {key.removesuffix('_bytes').replace('_', ' ')} px", f"{res[key]:.0f}")
        for code, row in res["codes"].items():
            acc = row["uploaded_mc_accuracy"]
            table.add_row(f"code {code}: bytes / upload, MC on uploads",
                          f"{row['bytes_per_upload']:.0f}, {'-' if acc is None else f'{acc:.3f}'}")
        for key in ("ratio_full_tokens", "ratio_png", "ratio_png_source_file", "ratio_jpeg224"):
            table.add_row(key, f"{res[key]:.4f}")
        t = res["timing"]
        table.add_row("answer ms / request", f"{t['answer_ms_per_request']:.2f}")
        for name, ms in t["uts_ms_per_request_all_uploaded"].items():
            table.add_row(f"UTS ms / request, all uploaded ({name})", f"{ms:.3f} ({t['overhead_by_token_scorer'][name]:.1%})")
        table.add_row("overhead (default, all uploaded)", f"{t['overhead']:.1%}")
        table.add_row("overhead (at upload rate)", f"{t['overhead_at_upload_rate']:.1%}")
        table.add_row("view_consistency scorer overhead", f"{t['view_consistency_overhead']:.1%}")
        console.print(table)
        for note in res["notes"]:
            console.print(f"note: {note}")
    print(json.dumps(res))


@bench_app.command("akd")
def bench_akd(
    variants: str | None = typer.Option(None, help="Comma-separated variants (default: all): source-only, cdcca, cdcca-dense, oracle, pseudo-label, no-gate, no-source-replay, soft-targets, akd-v1, loss:ce|ce+mse|ce+mse+wave|full, keep:R:ood|energy."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; one row per (variant, seed)."),
    stream: StreamOpt = None,
    scenario: ScenarioOpt = None,
    rounds_per_domain: RoundsPerDomainOpt = None,
    round_size: RoundSizeOpt = None,
    visits: VisitsOpt = None,
    update_delay: UpdateDelayOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    save_states: Path | None = typer.Option(None, help="Also save the device's adapter state after each round (for bench dwc)."),
    teacher_study: str | None = typer.Option(None, help="Instead: teacher vs device accuracy on the uploaded samples of this domain (e.g. pixelate:5), per token view."),
    label_study: str | None = typer.Option(None, help="Instead: teacher vs device accuracy on the uploads of every domain of this stream ('default'), per upload budget and teacher-confidence gate (no training)."),
    weights: WeightsOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
    torch_device: TorchDeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """AKD ablations on the continual stream: online MC and recovery, final held-out MC over shifted domains, source MC, cloud time."""
    from cdcca.bench import akd  # heavy: imported when the command runs, not for --help

    base = run_config(preset, config, [], stream=stream, scenario=scenario, rounds_per_domain=rounds_per_domain,
                      round_size=round_size, visits=visits, update_delay=update_delay, torch_device=torch_device,
                      weights=weights, dtype=dtype)
    use_threads(threads)
    if label_study:
        try:
            rows = akd.label_study(label_study)
        except ValueError as exc:
            fail(str(exc))
        if not as_json:
            _print_label_study(akd.pool_label_study(rows))
        print(json.dumps(rows))
        return
    if teacher_study:
        try:
            rows = akd.teacher_study(teacher_study)
        except ValueError as exc:
            fail(str(exc))
        if not as_json:
            for r in rows:
                console.print(r)
        print(json.dumps(rows))
        return
    names = [v.strip() for v in variants.split(",")] if variants else None
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        rows = akd.run(names, on_result=None if as_json else lambda r: console.print(r), base=base, seeds=seed_list,
                       sets=set_ or [], save_states=str(save_states) if save_states else None)
    except ValueError as exc:
        fail(str(exc))
    if not as_json:
        _print_akd_rows(rows)
    print(json.dumps(rows))


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    """A table of strings: what every benchmark prints above its JSON."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table


def _fmt3(v: float | None) -> str:
    """An accuracy to three places, or '-' where there is none."""
    return "-" if v is None else f"{v:.3f}"


def _print_label_study(pooled: list[dict]) -> None:
    """The label study's table: teacher vs device MC on the uploads, pooled over the stream's domains."""
    def lead(r: dict) -> str:
        return "-" if r["teacher_mc"] is None else f"{100 * (r['teacher_mc'] - r['device_mc']):+.1f}"

    table = _table("Teacher vs device on the uploads (MC), pooled over the stream's domains",
                   ("domain", "budget", "skip top", "labels", "gate", "kept/uploads", "teacher", "device", "lead"),
                   [("all", str(r["budget"]), f"{r['skip_top']:.2f}", r["labels"], f"{r['gate']:.2f}",
                     f"{r['kept']}/{r['uploads']}", _fmt3(r["teacher_mc"]), _fmt3(r["device_mc"]), lead(r)) for r in pooled])
    console.print(table)


def _print_akd_rows(rows: list[dict]) -> None:
    """The ablation table: one row per (variant, seed)."""
    table = _table("AKD on the stream (online MC: answers served; held-out MC after the stream)",
                   ("variant", "seed", "online MC", "recovery", "held-out MC", "clean MC", "trained/uploads",
                    "teacher on trained", "device on trained", "down KiB/round", "teacher s", "student s"),
                   [(r["variant"], str(r["seed"]), _fmt3(r.get("online_mc")),
                     " ".join(f"{v:.2f}" for v in r.get("recovery") or []), _fmt3(r["adapted_mc"]), _fmt3(r["source_mc"]),
                     f"{r['trained']}/{r['uploads']}", _fmt3(r["upload_teacher_mc"]), _fmt3(r["upload_device_mc"]),
                     f"{r['bytes_down_per_round'] / 1024:.0f}", str(r["teacher_s"]), str(r["student_s"])) for r in rows])
    console.print(table)


@bench_app.command("dwc")
def bench_dwc(
    states: Path = typer.Option(..., help="Folder of per-round AKD adapter states (from `cdcca bench akd --variants loss:full --save-states DIR`)."),
    settings: str | None = typer.Option(None, help="Comma-separated settings (default: all), e.g. int8:128K,nf4:32K,int8:128K:no-ef."),
    n: int = typer.Option(200, help="Held-out questions per domain."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
    torch_device: TorchDeviceOpt = None,
):
    """Downlink bytes vs accuracy on real AKD deltas, for several budgets and bit widths, with and without error feedback."""
    from cdcca.bench import dwc  # heavy: imported when the command runs, not for --help

    torch_device = torch_device_or_fail(torch_device)
    use_threads(threads)
    names = [v.strip() for v in settings.split(",")] if settings else None
    try:
        result = dwc.run(states, heldout_n=n, names=names, on_result=None if as_json else lambda r: console.print(r),
                         torch_device=torch_device)
    except (FileNotFoundError, KeyError) as exc:
        fail(str(exc))
    if not as_json:
        console.print(_table(
            f"DWC on {result['rounds']} rounds of AKD deltas (dense fp16 delta {result['dense_fp16_bytes'] / 1e6:.2f} MB)",
            ("setting", "bytes/round", "× dense fp16", "× device model", "held-out MC", "Δ vs dense"),
            [(r["setting"], str(r["bytes_per_round"]), f"{r['ratio_dense_fp16']:.4f}",
              f"{r.get('ratio_device_model', float('nan')):.2e}", f"{r['heldout_mc']:.3f}", f"{r['delta_vs_dense']:+.3f}")
             for r in result["results"]]))
        console.print(f"throughput: {result['throughput']}")
    print(json.dumps(result))


@bench_app.command("fleet")
def bench_fleet(
    devices: int = typer.Option(100, help="Simulated devices (tiny models)."),
    rounds: int = typer.Option(10, help="Protocol rounds."),
    group: str | None = typer.Option(None, help="A fleet group every device joins (one shared student per round); "
                                     "default: one student per device."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int | None = typer.Option(1, help="torch CPU threads."),
):
    """The cloud runtime under N devices for R rounds: uploads/s, upload-to-ack p50/p99, cloud s per round, lost and duplicated uploads."""
    from cdcca.bench.fleet import run_bench  # heavy: imported when the command runs, not for --help

    use_threads(threads)
    if devices < 1 or rounds < 1:
        fail("--devices and --rounds must be ≥ 1")
    try:
        res = run_bench(devices, rounds, group=group, log=None if as_json else console.print)
    except ValueError as exc:
        fail(str(exc))
    if not as_json:
        console.print(_table(f"cloud runtime under {devices} devices × {rounds} rounds (tiny models)",
                             ("measure", "value"), [(key, str(value)) for key, value in res.items()]))
    print(json.dumps(res))


@bench_app.command("cost")
def bench_cost(
    uploads: str = typer.Option("64,128,256,512", help="Uploads of one device per round, comma-separated."),
    devices: str = typer.Option("1,8,32", help="Devices per round, comma-separated (each with and without one group)."),
    per_device: int = typer.Option(16, help="Uploads per device in the devices rows."),
    requests: int = typer.Option(64, help="Requests timed one at a time on the device."),
    batch: int = typer.Option(16, help="Requests per batch in the batched timing."),
    tiny: bool = typer.Option(False, help="Tiny random models (the tiny preset): the table's shape in seconds, not its numbers."),
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    weights: WeightsOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
    torch_device: TorchDeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """One cost table: device latency, memory and size against the cloud's; cloud s per round by uploads and devices;
    bytes. The run config's AKD, DWC and UTS (its budget set per row)."""
    from cdcca.bench.cost import run_cost  # heavy: imported when the command runs, not for --help

    cfg = run_config(preset, config, set_, tiny=tiny, torch_device=torch_device, weights=weights, dtype=dtype)
    tiny, torch_device = cfg.model.tiny, cfg.torch_device
    use_threads(threads)
    with one_line_errors():
        up = [int(x) for x in uploads.split(",") if x.strip()]
        devs = [int(x) for x in devices.split(",") if x.strip()]
        if not up or not devs or min(up + devs + [per_device, requests, batch]) < 1:
            raise ValueError("--uploads, --devices, --per-device, --requests and --batch must be ≥ 1")
        res = run_cost(cfg, up, devs, per_device, requests, batch, log=None if as_json else console.print)
    if not as_json:
        console.print(_table(f"cost ({'tiny models' if tiny else 'real weights'}; cloud on {torch_device})",
                             ("row", "uploads", "cloud s", "bytes up", "bytes down"),
                             [(f"{r['devices']} device(s){' one group' if r['group'] else ''}", str(r["uploads"]),
                               str(r["cloud_s"]), str(r["bytes_up"]), str(r["bytes_down"]))
                              for r in res["cloud"]["by_uploads"] + res["cloud"]["by_devices"]]))
        d = res["device"]
        console.print(f"device: {d['per_request']} per request, {d['per_batch']} per batch, peak RSS {d['peak_rss_mib']} MiB, "
                      f"{d['params']['total']:,} params (cloud {res['cloud']['params']['total']:,}); "
                      f"fit by uploads {res['cloud']['fit_uploads']}")
    print(json.dumps(res))


@bench_app.command("api")
def bench_api(
    state: Path = typer.Option(..., help="Device state dir (from `cdcca device init`, real models)."),
    n: int = typer.Option(64, help="Requests per measurement."),
    concurrency: int = typer.Option(8, help="Concurrent clients in the batched measurement."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
):
    """Requests/s and p50/p99 latency of /v1/chat/completions: one at a time vs batched, against the device's own answer time."""
    from cdcca.bench.api import run_bench  # heavy: imported when the command runs, not for --help

    use_threads(threads)
    if n < 2 or concurrency < 1:
        fail("--n must be ≥ 2 and --concurrency ≥ 1")
    with one_line_errors():
        res = run_bench(state, n, concurrency)
    if not as_json:
        console.print(_table(f"device API on 127.0.0.1 ({n} requests each)", ("mode", "requests/s", "p50 ms", "p99 ms"),
                             [(r["mode"], str(r["requests_per_s"]), str(r["p50_ms"]), str(r["p99_ms"])) for r in res["rows"]]))
    print(json.dumps(res))


@bench_app.command("tta-rate")
def bench_tta_rate(
    method: str = typer.Option("tent", help="Device-only method: tent, eata or cotta."),
    rates: str = typer.Option("1e-4,3e-4,1e-3,3e-3", help="Comma-separated learning rates to try."),
    tolerance: float = typer.Option(0.01, help="Largest clean-accuracy drop a rate may cause."),
    n: int = typer.Option(200, help="Held-out clean questions."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
):
    """Choose a baseline's learning rate on the clean source domain only (no shifted data, no stream answer)."""
    from cdcca.bench.akd import BenchModels  # heavy: imported when the command runs, not for --help
    from cdcca.bench.baselines import tune_rate, with_rate  # heavy: imported when the command runs, not for --help

    use_threads(threads)
    with one_line_errors():
        rate_list = [float(r) for r in rates.split(",") if r.strip()]
        if not rate_list:
            raise ValueError("--rates: give at least one learning rate, e.g. 1e-4,1e-3")
        with_rate(method, rate_list[0])
        result = tune_rate(method, rate_list, BenchModels.load(), heldout_n=n, tolerance=tolerance,
                           on_result=None if as_json else lambda r: console.print(r))
    if not as_json:
        console.print(f"{method}: clean MC before {result['reference_clean_mc']:.3f}; chosen lr {result['chosen_lr']:g}")
    print(json.dumps(result))


@bench_app.command("paper")
def bench_paper(
    preset: str = typer.Option("quick", help="configs/bench-paper/NAME.toml: quick (100 held-out questions per domain; "
                               "Tables 3-4 on the first seed) or full (200, every seed); both on the scenario's stream."),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    weights: WeightsOpt = None,
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
    methods: str | None = typer.Option(None, help="Comma-separated Table 1 methods to run (then no ablation tables): "
                                       "source-only, bn, tent, tent+bn, eata, cotta, pseudo-label, cdcca-dense, cdcca, teacher, oracle."),
    scenario: ScenarioOpt = None,
    rounds_per_domain: RoundsPerDomainOpt = None,
    round_size: RoundSizeOpt = None,
    visits: VisitsOpt = None,
    update_delay: UpdateDelayOpt = None,

    out: Path = typer.Option(Path("runs/paper"), help="Output folder: cells/ (the resume point), paper.json, tables.md, plots, report.html."),
    link_mbps: float = typer.Option(10.0, help="Link speed for Table 5's transfer times, Mbit/s."),
    results_page: Path | None = typer.Option(None, help="Also write the tables into this page's bench-paper block (e.g. docs/RESULTS.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only (progress still goes to stderr)."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
    torch_device: TorchDeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """The paper's Tables 1, 3, 4, 5 on this benchmark: baselines, CDCCA, teacher and oracle over seeds; resumable."""
    from cdcca.bench.paper import plan, run_paper  # heavy: imported when the command runs, not for --help
    from cdcca.bench.paper_report import markdown, update_results_page  # heavy: imported when the command runs, not for --help

    base = run_config(None if config else preset, config, set_, kind="bench-paper", scenario=scenario,
                      rounds_per_domain=rounds_per_domain, round_size=round_size, visits=visits,
                      update_delay=update_delay, torch_device=torch_device, weights=weights, dtype=dtype)
    use_threads(threads)
    if link_mbps <= 0:
        fail(f"--link-mbps must be positive, got {link_mbps}")
    with one_line_errors():
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        name = str(config) if config is not None else preset
        plan(name, base, seed_list, method_list)          # bad seeds or methods fail before any model loads
        result = run_paper(name, base, seed_list, out, log=lambda m: console.print(m), link_mbps=link_mbps,
                           methods=method_list)
        if results_page:
            update_results_page(results_page, markdown(result))
    if not as_json:
        console.print((out / "tables.md").read_text())
        console.print(f"report: {out / 'report.html'}")
    print(json.dumps(result))

