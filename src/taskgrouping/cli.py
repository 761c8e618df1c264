"""Command-line interface: ``taskgrouping run | datasets | methods | select | tag-select |
balance-bench | interrogate-sweep | predict``.

Every command runs inside one error boundary (:class:`ErrorBoundary`): a user error, an OS error
(a full disk, a path that is not writable), a damaged file, a resource error is printed as one line
``error: ...`` on stderr with exit status 2 (``taskgrouping --debug ...`` shows the traceback
instead); Ctrl-C prints how to continue and exits with 130. Nothing is left half-written, and an
error found before training leaves nothing in ``--out``.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import click
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Which tasks should be learned together, and how.")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)
_SETTINGS = {"debug": False}

#: what an OS error means for the user, by errno
_OS_HINTS = {
    errno.ENOSPC: "no space left on device; free some space and run again",
    errno.EDQUOT: "disk quota exceeded; free some space and run again",
    errno.EACCES: "permission denied; expected a path this user can read or write",
    errno.EPERM: "operation not permitted; expected a path this user can read or write",
    errno.EROFS: "read-only file system; expected a writable location",
    errno.EISDIR: "is a directory; expected a file",
    errno.ENOTDIR: "a part of the path is not a directory; expected a directory there",
    errno.ENOENT: "does not exist",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error instead of "
                                        "one line.")) -> None:
    """Which tasks should be learned together, and how."""
    _SETTINGS["debug"] = debug


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_error(exc: BaseException, subject: str | None = None) -> tuple[str, int]:
    """The one-line message and exit status for an error; ``subject`` names the input being read
    when the error itself names none (e.g. ``--affinity FILE``)."""
    import yaml
    from safetensors import SafetensorError

    from taskgrouping.engine.checkpoint import CheckpointError
    from taskgrouping.engine.trainer import TrainingDiverged

    about = f"{subject}: " if subject else ""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        where = exc.filename if exc.filename is not None else subject
        hint = _OS_HINTS.get(exc.errno, exc.strerror)
        return _one_line(f"{where!s}: {hint}" if where else hint), 2
    if isinstance(exc, json.JSONDecodeError):
        return _one_line(f"{about}not valid JSON ({exc})"), 2
    if isinstance(exc, KeyError) and exc.args:
        return _one_line(str(exc.args[0])), 2
    if isinstance(exc, USER_ERRORS + (CheckpointError, TrainingDiverged)):
        return _one_line(str(exc) or type(exc).__name__), 2
    if isinstance(exc, yaml.YAMLError):
        return _one_line(f"{about}not valid YAML ({exc})"), 2
    if isinstance(exc, SafetensorError):
        return _one_line(f"{about or 'a weights file: '}not a valid safetensors file ({exc})"), 2
    if isinstance(exc, RecursionError):
        return f"{about or 'an input: '}nested too deeply (past Python's recursion limit); expected a flat file", 2
    if isinstance(exc, MemoryError):
        return (f"{about}out of memory; expected inputs that fit in memory (a smaller data set, "
                "train.batch_size or model)"), 2
    return _one_line(f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback "
                     "and report it"), 1


class ErrorBoundary:
    """Turns any error of a command into one line on stderr and an exit status (unless ``--debug``).

    Args:
        out: the command's output directory (set it as soon as it is known).
        resumable: the command continues with ``--resume --out DIR``.
        subject: the input the command reads, for errors that do not name it.
    """

    def __init__(self, out: Path | None = None, resumable: bool = False, subject: str | None = None) -> None:
        self.out, self.resumable, self.subject = out, resumable, subject

    def __enter__(self) -> "ErrorBoundary":
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or _SETTINGS["debug"] or isinstance(exc, (click.exceptions.Exit, click.ClickException,
                                                                  click.Abort, SystemExit)):
            return False
        if isinstance(exc, KeyboardInterrupt):
            typer.echo(f"interrupted: {self._how_to_continue()}", err=True)
            raise typer.Exit(130)
        if not isinstance(exc, Exception):
            return False
        if isinstance(exc, BrokenPipeError):  # the reader went away (``| head``): nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1)
        from taskgrouping.engine.trainer import TrainingDiverged

        msg, code = describe_error(exc, self.subject)
        if isinstance(exc, TrainingDiverged):
            msg = f"{msg}; {self._how_to_continue(diverged=True)}"
        typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(code)

    def _how_to_continue(self, diverged: bool = False) -> str:
        out = self.out
        if out is None or not out.is_dir():
            return "nothing was written; run the command again"
        if not self.resumable:
            return f"{out} is incomplete and this command cannot resume; run it again with another --out"
        if diverged:
            return (f"{out} keeps every committed epoch: `--resume --out {out}` continues from the last one with "
                    "the same config (and repeats the same steps); to change train.lr or the data, start a new --out")
        return f"{out} keeps every committed epoch; continue with the same command and --resume --out {out}"


def _input_file(option: str, path: Path | None) -> None:
    """An input option must name an existing file."""
    if path is None:
        return
    if not path.exists():
        raise FileNotFoundError(f"{option} {str(path)!r} does not exist; expected a file")
    if not path.is_file():
        raise ValueError(f"{option} {str(path)!r} is not a file; expected a file")


@app.command()
def run(config: Optional[Path] = typer.Argument(None, help="YAML config file."),
        preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Built-in preset (see `datasets`)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results directory."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Override a key, e.g. --set data.n_tasks=16."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final table.")) -> None:
    """Train the configured methods side by side on the same data and print the comparison table."""
    with ErrorBoundary(resumable=True) as boundary:
        from taskgrouping.config import build_config
        from taskgrouping.experiment import run_experiment

        cfg = build_config(config, preset, set_)
        if out is None:
            if resume:
                raise ValueError("--resume needs --out DIR (the run to continue)")
            out = Path("runs") / f"{cfg.get('name') or 'run'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        boundary.out = out
        run_experiment(cfg, out, resume=resume, echo=(lambda s: None) if quiet else typer.echo)
        if quiet:
            typer.echo((out / "table.md").read_text())
        typer.echo(f"results in {out}")


@app.command()
def datasets() -> None:
    """List the datasets and presets, with the tasks of the built-in ones."""
    with ErrorBoundary():
        _list_datasets()


def _list_datasets() -> None:
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
    with ErrorBoundary():
        from taskgrouping.methods.base import METHOD_OPTIONS, available_methods

        for name, fn in sorted(available_methods().items()):
            doc = _first_paragraph(fn.__doc__)
            opts = ", ".join(f"{k}={v!r}" for k, v in METHOD_OPTIONS[name].defaults().items())
            typer.echo(f"{name}: {doc}" + (f"  [options: {opts}]" if opts else ""))


def _first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph (up to the first blank line) as one line."""
    lines = inspect.cleandoc(doc or "").split("\n\n", 1)[0].split()
    return " ".join(lines)


@app.command()
def select(losses: Path = typer.Option(..., "--losses", help="Per-network validation losses (Standley results "
                                        "file or CSV) used to choose networks."),
           report: Optional[Path] = typer.Option(None, "--report", help="Per-network test losses to report."),
           approx: str = typer.Option("optimal", "--approx", help="optimal | hoa | esa"),
           early: Optional[Path] = typer.Option(None, "--early", help="Losses early in training (for esa)."),
           budgets: str = typer.Option("1:5:0.5", "--budgets", help="start:stop:step (inclusive) or a,b,c"),
           solver: str = typer.Option("auto", "--solver", help="auto (search up to 64 networks, else milp) | "
                                      "search (Standley's branch and bound) | milp"),
           tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated task names for the columns "
                                               "of a Standley results file."),
           as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Standley et al. network selection under inference-time budgets."""
    inputs = ", ".join(f"{o} {str(f)!r}" for o, f in (("--losses", losses), ("--report", report),
                                                       ("--early", early)) if f is not None)
    with ErrorBoundary(subject=inputs):
        from taskgrouping.methods.standley.cli import select_cli

        for option, path in (("--losses", losses), ("--report", report), ("--early", early)):
            _input_file(option, path)
        curve = select_cli(str(losses), budgets, report=str(report) if report else None, approx=approx,
                           early=str(early) if early else None, solver=solver,
                           tasks=tasks.split(",") if tasks else None)
    if as_json:
        from taskgrouping.io import strict_json

        typer.echo(strict_json(curve))
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
    with ErrorBoundary(subject=f"--affinity {str(affinity)!r}"):
        from taskgrouping.methods.tag.cli import tag_select_cli

        _input_file("--affinity", affinity)
        result = tag_select_cli(affinity, groups)
    if as_json:
        from taskgrouping.io import strict_json

        typer.echo(strict_json(result))
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


def _csv(text: str, cast=str, option: str = "") -> list:
    values = []
    for v in (v.strip() for v in text.split(",")):
        if v:
            try:
                values.append(cast(v))
            except ValueError:
                raise ValueError(f"{option} {text!r}: {v!r} is not a {cast.__name__}; expected a comma-separated "
                                 f"list of {cast.__name__}s") from None
    return values


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
    with ErrorBoundary(out=out):
        from taskgrouping.balancing.study import run_benchmark
        from taskgrouping.engine.driver import discard_on_error

        cfg = _config(config, preset, set_)
        with discard_on_error(out):
            run_benchmark(cfg, _csv(balancers), _csv(levels), _csv(seeds, int, "--seeds"), out, diagnostics_every,
                          diagnostics_level=diagnostics_level, echo=typer.echo)
        typer.echo(f"results in {out}")


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
    with ErrorBoundary(out=out):
        from taskgrouping.engine.driver import discard_on_error
        from taskgrouping.methods.interrogate import interrogate_sweep_cli

        cfg = _config(config, preset, set_)
        with discard_on_error(out):
            typer.echo(interrogate_sweep_cli(cfg, _csv(lambdas, float, "--lambdas"), _csv(seeds, int, "--seeds"),
                                             out))
        typer.echo(f"results in {out}")


@app.command()
def predict(run_dir: Path = typer.Argument(..., help="A run directory written by `taskgrouping run`."),
            method: str = typer.Option(..., "--method", "-m", help="The method whose saved model predicts."),
            out: Path = typer.Option(..., "--out", "-o", help="FILE.csv (one column per task) or FILE.npz (one "
                                     "array per task; dense tasks too)."),
            split: str = typer.Option("test", "--split", help="train | val | test"),
            data: Optional[Path] = typer.Option(None, "--data", help="YAML file of data keys ({name: npz, path: "
                                                "...} or {data: {...}}) replacing the run's data; tasks must "
                                                "match the model's."),
            set_: list[str] = typer.Option([], "--set", "-s", help="Change a data key, e.g. --set data.path=new.npz."),
            device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (default: the run's "
                                                 "train.device)."),
            metrics: bool = typer.Option(False, "--metrics", help="Print, as the last line, the JSON object "
                                         "{task: {metric: value}} of these predictions.")) -> None:
    """Predict with a run's saved model: probability of class 1 for binary tasks, class id for multi-class
    tasks, value for regression; without --data, on the run's own data (drawn again as the run drew it)."""
    with ErrorBoundary(subject=f"run {str(run_dir)!r}"):
        from taskgrouping.io import strict_json
        from taskgrouping.predict import check_output_path, predict_run, write_predictions

        check_output_path(out)
        if device is not None and device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {device!r}: expected auto, cpu or cuda")
        run, preds = predict_run(run_dir, method, split, data, set_, device, out)
        write_predictions(preds, out)
        draws = run.record(method).get("averaged_over_draws") or 1
        if draws > 1:
            typer.echo(f"note: results.json averages {method}'s metrics over {draws} draws; the saved model is the "
                       f"first draw's (its metrics are methods.{method}.draws[0].per_task)", err=True)
        typer.echo(f"wrote {preds.n} predictions of {len(preds.tasks)} tasks ({split} split, method {method}) "
                   f"to {out}")
        if metrics:
            typer.echo(strict_json(preds.metrics))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["app", "main"]
