"""``cdcca weights``: what a trained pair's directory holds and what it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cdcca.cli.common import console, fail
from cdcca.trained_pair import ROLES, PairError, open_pair

weights_app = typer.Typer(no_args_is_help=True, help="Inspect a trained pair's directory (cdcca pretrain --out writes one).")


@weights_app.command("inspect")
def inspect(
    directory: Path | None = typer.Argument(None, help="The weights directory (default: the shipped pair)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON."),
):
    """The pair's task (files, content digests, answer set), image size, models, each role's recipe stages
    and whether it is complete; its data is checked against the recorded digests."""
    try:
        pair = open_pair(directory)
        task = pair.task                  # checks the recorded files and digests
    except PairError as exc:
        fail(str(exc))
    record = pair.record
    if as_json:
        print(json.dumps({"root": str(pair.root), **record, "missing": pair.missing()}, indent=2))
        return
    t = record["task"]
    console.print(f"[bold]{pair.root}[/bold]{' (shipped)' if pair.shipped else ''}")
    console.print(f"task      {t['name']}: train {task.train_path or 'easy-VQA (built in)'}, test {task.test_path or 'easy-VQA (built in)'}")
    console.print("digests   " + ", ".join(f"{k} {v}" for k, v in t["digest"].items()) + " (data unchanged)")
    console.print(f"answers   {len(t['answers'])}: " + ", ".join(t["answers"]))
    try:
        spec = pair.spec
    except PairError as exc:
        fail(str(exc))
    console.print(f"models    {record.get('image_size')}² images; {spec.describe()}")
    for role in ROLES:
        stages = record.get("stages", {}).get(role, [])
        steps = " → ".join(f"{s.get('recipe', 'end-to-end')} ({s.get('config', {}).get('steps', s.get('steps', '?'))} "
                           f"steps, {s.get('train_s', '?')} s)" for s in stages)
        console.print(f"{role:<9} {steps or 'not trained yet'}")
    missing = pair.missing()
    console.print("complete  yes: serve it with --weights" if not missing else f"complete  no: {', '.join(missing)} missing")
