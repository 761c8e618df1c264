"""Hostile inputs to ``taskgrouping select``: unreadable, binary, malformed or oversized loss files and
budget specs that would run for ever are each one ``ValueError`` / ``FileNotFoundError`` line naming
the file (or the spec) and what was expected; the CLI prints it as ``error: ...`` with exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import taskgrouping.readers as readers
from taskgrouping.cli import app
from taskgrouping.methods.standley.cli import MAX_BUDGETS, parse_budgets, select_cli
from taskgrouping.methods.standley.io import read_networks

GOOD = "tasks,cost,a,b\na,0.5,1,\nb,0.5,,2\na|b,1,1.5,2.5\n"


def _fails(path, match, exc=ValueError, **kwargs):
    with pytest.raises(exc, match=match) as info:
        select_cli(str(path), "1", **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_good_file_still_selects(tmp_path):
    (tmp_path / "l.csv").write_text(GOOD)
    assert select_cli(str(tmp_path / "l.csv"), "1:2:1") == {
        "1": {"networks": [{"tasks": ["a"], "cost": 0.5}, {"tasks": ["b"], "cost": 0.5}], "total": 3.0},
        "2": {"networks": [{"tasks": ["a"], "cost": 0.5}, {"tasks": ["b"], "cost": 0.5}], "total": 3.0}}


@pytest.mark.parametrize("name", ["d.csv", "d"])
def test_a_directory_is_named(tmp_path, name):
    (tmp_path / name).mkdir()
    _fails(tmp_path / name, rf"{name}: is a directory; expected a (CSV loss table|Standley results file)")


@pytest.mark.parametrize("name", ["none.csv", "none.txt"])
def test_a_missing_file_is_named(tmp_path, name):
    _fails(tmp_path / name, rf"{name}: no such file; expected", FileNotFoundError)


@pytest.mark.parametrize("name", ["e.csv", "e.txt"])
def test_an_empty_file_is_named(tmp_path, name):
    (tmp_path / name).write_text("")
    _fails(tmp_path / name, rf"{name}: (empty file|the file holds no networks); expected")


@pytest.mark.parametrize("name, data, match", [
    ("b.csv", bytes(range(256)), r"b\.csv: holds NUL bytes \(a binary file\?\); expected a CSV loss table"),
    ("b.txt", b"\x89PNG\r\n\x1a\n" + b"\xff" * 40, r"b\.txt: not UTF-8 text \(byte 0 is 0x89\); expected a Standley"),
    ("n.csv", b"tasks,cost,a\na\x00,0.5,1\n", r"n\.csv: holds NUL bytes"),
])
def test_binary_files_are_named(tmp_path, name, data, match):
    (tmp_path / name).write_bytes(data)
    _fails(tmp_path / name, match)


def test_malformed_csv_is_named_with_its_line(tmp_path):
    (tmp_path / "f.csv").write_text("tasks,cost,a\na,0.5,\"" + "x" * 200_000 + "\"\n")
    _fails(tmp_path / "f.csv", r"f\.csv, line 2: malformed CSV \(field larger than field limit")


@pytest.mark.parametrize("name, text, match", [
    ("nan.csv", "tasks,cost,a\na,0.5,nan\n", r"nan\.csv, line 2, column 'a': expected a finite number, got 'nan'"),
    ("inf.txt", "inf\t1\n", r"inf\.txt, line 1, column 1 \(task0\): expected a finite number, got 'inf'"),
    ("j.csv", '{"a": 1}\n', r"j\.csv, line 1: header must be 'tasks,cost,<task>,...'"),
    ("j.txt", '{"a": 1}\n', r"j\.txt, line 1, column 1 \(task0\): '\{\"a\": 1\}' is not a number"),
])
def test_malformed_values_are_named(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    _fails(tmp_path / name, match)


def test_an_oversized_file_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_TEXT_BYTES", 32)
    (tmp_path / "big.csv").write_text(GOOD)
    _fails(tmp_path / "big.csv", r"big\.csv: larger than 32 bytes")


def test_report_and_early_files_are_checked_alike(tmp_path):
    (tmp_path / "l.csv").write_text(GOOD)
    (tmp_path / "r.csv").mkdir()
    with pytest.raises(ValueError, match=r"r\.csv: is a directory"):
        select_cli(str(tmp_path / "l.csv"), "1", report=str(tmp_path / "r.csv"))
    assert read_networks(tmp_path / "l.csv").tasks == ("a", "b")


@pytest.mark.parametrize("spec", ["0:1000000:0.001", "0:1e308:1e-308", f"0:{MAX_BUDGETS}:1", "0:9999.9999999999:1",
                                  ",".join(["1"] * (MAX_BUDGETS + 1))])
def test_budget_lists_are_capped(spec):
    with pytest.raises(ValueError, match=rf"gives more than {MAX_BUDGETS:,} budgets; at most {MAX_BUDGETS:,} are "
                                         "allowed") as info:
        parse_budgets(spec)
    assert len(str(info.value)) < 200


def test_the_largest_allowed_range_is_accepted():
    assert len(parse_budgets(f"1:{MAX_BUDGETS}:1")) == MAX_BUDGETS


def test_budget_sequences_are_capped_in_the_api(tmp_path):
    (tmp_path / "l.csv").write_text(GOOD)
    with pytest.raises(ValueError, match=f"at most {MAX_BUDGETS:,} are allowed"):
        select_cli(str(tmp_path / "l.csv"), [1.0] * (MAX_BUDGETS + 1))


@pytest.mark.parametrize("args, match", [
    (["--budgets", "0:1000000:0.001"], "error: budget spec '0:1000000:0.001': gives more than 10,000 budgets"),
    (["--budgets", "0:1:nan"], "error: budget spec '0:1:nan': budgets must be finite"),
])
def test_cli_prints_one_error_line(tmp_path, args, match):
    (tmp_path / "l.csv").write_text(GOOD)
    res = CliRunner().invoke(app, ["select", "--losses", str(tmp_path / "l.csv"), *args])
    assert res.exit_code == 2
    assert res.stderr.startswith(match) and res.stderr.count("\n") == 1


def test_cli_names_a_binary_loss_file(tmp_path):
    (tmp_path / "b.csv").write_bytes(b"\xff\xfe" * 50)
    res = CliRunner().invoke(app, ["select", "--losses", str(tmp_path / "b.csv")])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and "b.csv: not UTF-8 text" in res.stderr and res.stderr.count("\n") == 1


def test_a_table_with_too_many_task_columns_is_refused(tmp_path):
    from taskgrouping.methods.standley.io import MAX_TASKS

    (tmp_path / "wide.txt").write_text("\t".join(["1"] * 1_000_000) + "\n")
    _fails(tmp_path / "wide.txt", rf"wide\.txt, line 1: 1000000 tab-separated fields; at most {MAX_TASKS} tasks")
    names = [f"t{i}" for i in range(MAX_TASKS + 1)]
    (tmp_path / "wide.csv").write_text("tasks,cost," + ",".join(names) + "\n")
    _fails(tmp_path / "wide.csv", rf"wide\.csv, line 1: {MAX_TASKS + 1} task columns; at most {MAX_TASKS}")


def test_a_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert read_networks(tmp_path / "bom.csv").tasks == ("a", "b")
