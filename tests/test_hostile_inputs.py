"""A replay of hostile inputs to every command: each is refused with exit status 2 and ONE line
``error: ...`` naming what is wrong, no traceback, and nothing is left in ``--out``.

Run in process (``typer.testing.CliRunner``), so the whole replay takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import write_npz
import pytest
from typer.testing import CliRunner

from taskgrouping.cli import app

SMALL = ["--set", "train.epochs=1", "--set", "train.progress=false"]
BOMB = ('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
        'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n'
        'e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n'
        'g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nname: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n')


def _npz(path: Path, **arrays) -> Path:
    return write_npz(path, types=("binary", "binary"), **arrays)


def _huge_header_npz(path: Path) -> Path:
    """A valid .npz whose x_train header claims a 29 TiB float64 array (the data is not there)."""
    import zipfile

    good = _npz(path.with_name("good.npz"))
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 5)))
    header["shape"] = (800_000_000_000, 5)
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.namelist():
            dst.writestr(item, buf.getvalue() if item == "x_train.npy" else src.read(item))
    return path


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after ``run --preset digits --out OUT`` or a full command, text the error must contain)."""
    out_file = tmp / "a_file"
    out_file.write_text("x")
    bomb = tmp / "bomb.yaml"
    bomb.write_text(BOMB)
    not_yaml = tmp / "bad.yaml"
    not_yaml.write_text("a: [1, 2\n")
    deep_yaml = tmp / "deep.yaml"
    deep_yaml.write_text("name: " + "[" * 200 + "]" * 200 + "\n")
    list_yaml = tmp / "list.yaml"
    list_yaml.write_text("- 1\n- 2\n")
    nan_x = _npz(tmp / "nan_x.npz", x_train=np.full((40, 5), np.nan))
    no_val = _npz(tmp / "no_val.npz", y_val=np.stack([np.full(10, np.nan), np.ones(10)], 1))
    no_test = _npz(tmp / "no_test.npz", y_test=np.stack([np.ones(10), np.full(10, np.nan)], 1))
    strings = _npz(tmp / "strings.npz", y_train=np.array([["a", "b"]] * 40))
    huge = _huge_header_npz(tmp / "huge.npz")
    losses = tmp / "losses.csv"
    losses.write_text("tasks,cost,a,b\na,1,0.5,\nb,1,,0.4\na|b,1,0.45,0.35\n")
    deep = tmp / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    npz = ["--set", "data.name=npz", "--set", "K=2", "--set", "methods=[naive_mtl]"]
    return {
        "epochs not an integer": (["--set", "train.epochs=1.5"], "train.epochs"),
        "empty override key": (["--set", ".x=1"], ".x=1"),
        "seed not an integer": (["--set", "seed=1.5"], "seed"),
        "K a boolean": (["--set", "K=true"], "K must be an integer"),
        "threads a boolean": (["--set", "threads=true"], "threads"),
        "shared blocks beyond the backbone": (["--set", "model.shared_blocks=9"], "model.shared_blocks"),
        "deeply nested YAML": ([str(deep_yaml)], "nested"),
        "batch size not an integer": (["--set", "train.batch_size=1.5"], "train.batch_size"),
        "infinite learning rate": (["--set", "train.lr=.inf"], "train.lr"),
        "string learning rate": (["--set", "train.lr=fast"], "train.lr"),
        "nested method list": (["--set", "methods=[[naive_mtl]]"], "methods"),
        "negative width": (["--set", "model.options.widths=[-5]"], "model.options"),
        "unknown backbone": (["--set", "model.backbone=resnet1000"], "resnet1000"),
        "unknown balancer": (["--set", "balancer.name=magic"], "magic"),
        "bad balancer option": (["--set", "balancer.name=uw", "--set", "balancer.options.bogus=1"], "bogus"),
        "oracle without known groups": (["--set", "methods=[oracle]"], "oracle"),
        "DMTG tau": (["--set", "methods=[dmtg]", "--set", "dmtg.tau=-1"], "dmtg.tau"),
        "unknown method option": (["--set", "random.bogus=1"], "random.bogus"),
        "name with a path": (["--set", "name=/abs/path"], "name"),
        "name climbing out": (["--set", "name=../up"], "name"),
        "YAML alias bomb": ([str(bomb)], "alias"),
        "config not YAML": ([str(not_yaml)], str(not_yaml)),
        "config not a mapping": ([str(list_yaml)], str(list_yaml)),
        "config missing": ([str(tmp / "nope.yaml")], "nope.yaml"),
        "config is a directory": ([str(tmp)], str(tmp)),
        "out is a file": (["--out", str(out_file)], str(out_file)),
        "NaN in inputs": ([*npz, "--set", f"data.path={nan_x}"], "inputs (x) hold NaN"),
        "task without validation labels": ([*npz, "--set", f"data.path={no_val}"], "'a'"),
        "task without test labels": ([*npz, "--set", f"data.path={no_test}"], "'b'"),
        "string labels": ([*npz, "--set", f"data.path={strings}"], str(strings)),
        "array header claims 29 TiB": ([*npz, "--set", f"data.path={huge}"], "x_train"),
        "data path is a directory": ([*npz, "--set", f"data.path={tmp}"], str(tmp)),
        "select on a directory": (["select", "--losses", str(tmp), "--budgets", "1:2:0.5"], str(tmp)),
        "select with endless budgets": (["select", "--losses", str(losses), "--budgets", "0:1000000:0.001"],
                                        "10,000 budgets"),
        "tag-select on deep JSON": (["tag-select", "--affinity", str(deep), "-k", "2"], str(deep)),
        "balance-bench unknown balancer": (["balance-bench", "--preset", "digits", "--balancers", "magic",
                                            "--out", "OUT"], "magic"),
        "interrogate-sweep bad lambdas": (["interrogate-sweep", "--preset", "digits", "--lambdas", "abc",
                                           "--out", "OUT"], "abc"),
    }


CASES = ["epochs not an integer", "empty override key", "seed not an integer", "K a boolean", "threads a boolean",
         "shared blocks beyond the backbone", "deeply nested YAML", "batch size not an integer", "infinite learning rate", "string learning rate",
         "nested method list", "negative width", "unknown backbone", "unknown balancer", "bad balancer option",
         "oracle without known groups", "DMTG tau", "unknown method option", "name with a path", "name climbing out",
         "YAML alias bomb", "config not YAML", "config not a mapping", "config missing", "config is a directory",
         "out is a file", "NaN in inputs", "task without validation labels", "task without test labels",
         "string labels", "array header claims 29 TiB", "data path is a directory", "select on a directory",
         "select with endless budgets", "tag-select on deep JSON", "balance-bench unknown balancer",
         "interrogate-sweep bad lambdas"]
COMMANDS = ("select", "tag-select", "balance-bench", "interrogate-sweep")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[Path, dict[str, tuple[list[str], str]]]:
    tmp = tmp_path_factory.mktemp("hostile")
    return tmp, cases(tmp)


def test_every_case_is_listed(table):
    assert sorted(table[1]) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_hostile_input_is_one_line_and_leaves_nothing(table, name):
    tmp, known = table
    args, expected = known[name]
    out = tmp / ("out_" + "".join(c if c.isalnum() else "_" for c in name))
    if args[0] in COMMANDS:
        argv = [str(out) if a == "OUT" else a for a in args]
    elif not args[0].startswith("--"):  # a config file
        argv = ["run", args[0], "--out", str(out), *SMALL, *args[1:]]
    else:
        argv = ["run", "--preset", "digits", "--out", str(out), *SMALL, *args]
    result = CliRunner().invoke(app, argv)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() or name == "out is a file"
