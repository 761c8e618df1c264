"""Command-line interface: ``taskgrouping run | datasets | methods | select | tag-select``.

Every user error is printed as one line ``error: ...`` on stderr with exit status 2; nothing is
left half-written.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Which tasks should be learned together, and how.")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _fail(exc: BaseException) -> None:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[BaseException], ...]:
    from taskgrouping.engine.checkpoint import CheckpointError
    from taskgrouping.engine.trainer import TrainingDiverged

    return USER_ERRORS + (TrainingDiverged, CheckpointError)


@app.command()
def run(config: Optional[Path] = typer.Argument(None, help="YAML config file."),
        preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Built-in preset (see `datasets`)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results directory."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Override a key, e.g. --set data.n_tasks=16."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final table.")) -> None:
    """Train the configured methods side by side on the same data and print the comparison table."""
    from taskgrouping.config import build_config
    from taskgrouping.experiment import run_experiment

    try:
        cfg = build_config(config, preset, set_)
        if out is None:
            if resume:
                raise ValueError("--resume needs --out DIR (the run to continue)")
            out = Path("runs") / f"{cfg.get('name') or 'run'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        run_experiment(cfg, out, resume=resume, echo=(lambda s: None) if quiet else typer.echo)
        if quiet:
            typer.echo((out / "table.md").read_text())
        typer.echo(f"results in {out}")
    except _user_errors() as exc:
        _fail(exc)


@app.command()
def datasets() -> None:
    """List the datasets and presets, with the tasks of the built-in ones."""
    from taskgrouping.config import preset_names
    from taskgrouping.data.registry import available_datasets, load_dataset

    for name, fn in available_datasets().items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        typer.echo(f"{name}: {doc}")
        if name in ("planted", "digits"):
            data = load_dataset(name)
            typer.echo(f"    tasks: {', '.join(data.task_names)}")
            if data.groups:
                typer.echo(f"    known groups: {data.groups}")
        elif name == "multimnist":
            from taskgrouping.data.builtin import DIGIT_PROPERTIES

            typer.echo(f"    tasks: {', '.join(f'{s}_{p}' for s in ('left', 'right') for p in DIGIT_PROPERTIES)}")
    typer.echo(f"presets: {', '.join(preset_names())}")


@app.command()
def methods() -> None:
    """List the methods and their options."""
    from taskgrouping.methods.base import METHOD_OPTIONS, available_methods

    for name, fn in sorted(available_methods().items()):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        opts = ", ".join(f"{k}={v!r}" for k, v in METHOD_OPTIONS[name].defaults().items())
        typer.echo(f"{name}: {doc}" + (f"  [options: {opts}]" if opts else ""))


@app.command()
def select(losses: Path = typer.Option(..., "--losses", help="Per-network validation losses (Standley results "
                                        "file or CSV) used to choose networks."),
           report: Optional[Path] = typer.Option(None, "--report", help="Per-network test losses to report."),
           approx: str = typer.Option("optimal", "--approx", help="optimal | hoa | esa"),
           early: Optional[Path] = typer.Option(None, "--early", help="Losses early in training (for esa)."),
           budgets: str = typer.Option("1:5:0.5", "--budgets", help="start:stop:step (inclusive) or a,b,c"),
           solver: str = typer.Option("search", "--solver", help="search (Standley's branch and bound) | milp"),
           tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated task names for the columns "
                                               "of a Standley results file."),
           as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Standley et al. network selection under inference-time budgets."""
    from taskgrouping.methods.standley.cli import select_cli

    try:
        curve = select_cli(str(losses), budgets, report=str(report) if report else None, approx=approx,
                           early=str(early) if early else None, solver=solver,
                           tasks=tasks.split(",") if tasks else None)
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(curve))
        return
    typer.echo("| budget | total | networks |\n|---|---|---|")
    for budget, sel in curve.items():
        nets = "; ".join("{" + ",".join(n["tasks"]) + f"}}x{n['cost']:g}" for n in sel["networks"])
        typer.echo(f"| {budget} | {sel['total']:.6f} | {nets} |")


@app.command("tag-select")
def tag_select(affinity: Path = typer.Option(..., "--affinity", help="JSON {recipient: {source: value}}."),
               groups: int = typer.Option(..., "--groups", "-k", help="At most this many groups."),
               as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """TAG group selection from an inter-task affinity matrix (overlap allowed)."""
    from taskgrouping.methods.tag.cli import tag_select_cli

    try:
        result = tag_select_cli(affinity, groups)
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for i, g in enumerate(result["groups"]):
        served = [t for t, k in result["serves"].items() if k == i]
        typer.echo(f"group {i}: {{{', '.join(g)}}}  serves {{{', '.join(served)}}}")


def _config(config: Optional[Path], preset: Optional[str], overrides: list[str]) -> dict:
    """The validated config, with torch's thread count applied (for commands that train directly)."""
    from taskgrouping.config import build_config

    cfg = build_config(config, preset, overrides)
    if cfg["threads"]:
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    return cfg


def _csv(text: str, cast=str) -> list:
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


@app.command("balance-bench")
def balance_bench(config: Optional[Path] = typer.Argument(None, help="YAML config file."),
                  preset: Optional[str] = typer.Option(None, "--preset", "-p"),
                  balancers: str = typer.Option("ew,pcgrad,mgda,cagrad,uw,dwa", "--balancers",
                                                help="Comma-separated balancer names."),
                  levels: str = typer.Option("param,feature", "--levels", help="param, feature or both."),
                  seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
                  out: Path = typer.Option(Path("runs/balance-bench"), "--out", "-o"),
                  diagnostics_every: int = typer.Option(10, "--diagnostics-every"),
                  diagnostics_level: str = typer.Option("param", "--diagnostics-level", help="param | feature"),
                  set_: list[str] = typer.Option([], "--set", "-s")) -> None:
    """Balancers x {parameter, feature level} on naive MTL: the paper-style table (Mao et al.) with
    arrows vs EW, Delta_MTL, mean rank, and the ranking similarity of GDS / GMS / FD."""
    from taskgrouping.balancing.study import run_benchmark

    try:
        cfg = _config(config, preset, set_)
        run_benchmark(cfg, _csv(balancers), _csv(levels), _csv(seeds, int), out, diagnostics_every,
                      diagnostics_level=diagnostics_level, echo=typer.echo)
        typer.echo(f"results in {out}")
    except _user_errors() as exc:
        _fail(exc)


@app.command("interrogate-sweep")
def interrogate_sweep(config: Optional[Path] = typer.Argument(None, help="YAML config file."),
                      preset: Optional[str] = typer.Option(None, "--preset", "-p"),
                      lambdas: str = typer.Option("0.01,0.03,0.05,0.07,0.1", "--lambdas",
                                                  help="Comma-separated sparsity weights lambda_s."),
                      seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
                      out: Path = typer.Option(Path("runs/interrogate-sweep"), "--out", "-o"),
                      set_: list[str] = typer.Option([], "--set", "-s")) -> None:
    """InterroGate's accuracy / FLOPs trade-off over lambda_s against STL and naive MTL (paper Fig. 2),
    with the per-layer sharing pattern (Fig. 3)."""
    from taskgrouping.methods.interrogate import interrogate_sweep_cli

    try:
        cfg = _config(config, preset, set_)
        typer.echo(interrogate_sweep_cli(cfg, _csv(lambdas, float), _csv(seeds, int), out))
        typer.echo(f"results in {out}")
    except _user_errors() as exc:
        _fail(exc)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["app", "main"]
