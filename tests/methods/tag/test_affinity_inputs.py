"""Hostile affinity files for ``taskgrouping tag-select`` / ``load_affinity``: deep nesting, repeated
keys, wrong shapes, non-numeric or non-finite values, overlong integers, binary and oversized files
are each one ``ValueError`` / ``FileNotFoundError`` line naming the file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import taskgrouping.readers as readers
from taskgrouping.cli import app
from taskgrouping.methods.tag.affinity_table import load_affinity
from taskgrouping.methods.tag.cli import tag_select_cli
from taskgrouping.methods.tag.selection import select_groups

GOOD = {"a": {"a": 0, "b": 1, "c": 0.5}, "b": {"a": 1, "b": 0, "c": 0.2}, "c": {"a": 1, "b": 0, "c": 0}}


def _fails(path, match, exc=ValueError):
    with pytest.raises(exc, match=match) as info:
        tag_select_cli(path, 2)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_good_file_still_selects(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(GOOD))
    assert tag_select_cli(tmp_path / "a.json", 2) == {"groups": [["a", "b"], ["a", "c"]],
                                                      "serves": {"a": 0, "b": 0, "c": 1}}


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, r"a\.json: JSON nested more than 8 levels deep; expected a JSON object"),
    ('{"a":' * 50 + "1" + "}" * 50, r"a\.json: JSON nested more than 8 levels deep"),
    ('{"a": {"a": 0, "b": 1}, "b": {"a": 1, "b": 0}, "a": {"a": 0, "b": 1}}', r"a\.json: key 'a' appears twice"),
    ('{"a": {"a": 0, "a": 1}}', r"a\.json: key 'a' appears twice"),
    ('{"a": {"a": 0, "b": 1' + "0" * 5000 + '}, "b": {"a": 1, "b": 0}}',
     r"a\.json: an integer of 5001 digits \(100000000000\.\.\.\); at most 100 are accepted"),
    ('{"a": {"a": 0, "b": 1e999}, "b": {"a": 1, "b": 0}}', r"onto 'a' must be a finite number, got inf"),
    ('{"a": {"a": 0, "b": NaN}, "b": {"a": 1, "b": 0}}', r"affinity of 'b' onto 'a' must be a finite number, got nan"),
    ('{"a": {"a": 0, "b": "1"}, "b": {"a": 1, "b": 0}}', r"must be a finite number, got '1'"),
    ('{"a": {"a": 0, "b": true}, "b": {"a": 1, "b": 0}}', r"must be a finite number, got True"),
    ('{"a": {"a": 0, "b": [1]}, "b": {"a": 1, "b": 0}}', r"must be a finite number, got \[1\]"),
    ("[[0, 1], [1, 0]]", r"a\.json: expected a non-empty JSON object \{recipient: \{source: value\}\}, got list"),
    ("{}", r"a\.json: expected a non-empty JSON object"),
    ('{"a": [0, 1], "b": [1, 0]}', r"the entry of task 'a' must be an object \{source: value\}, got list"),
    ('{"a": {"a": 0, "b": 1}, "b": {"a": 1, "c": 0}}', r"task 'b' has a different source set than 'a'"),
    ('{"a": {"a": 0, "c": 1}, "b": {"a": 1, "c": 0}}', r"matrix is not square over the same tasks"),
    ("", r"a\.json: not valid JSON \(Expecting value: line 1 column 1 \(char 0\)\)"),
    ('{"a": {"a": 0,', r"a\.json: not valid JSON"),
])
def test_malformed_tables_are_named(tmp_path, text, match):
    (tmp_path / "a.json").write_text(text)
    _fails(tmp_path / "a.json", match)


def test_an_integer_beyond_the_float_range_is_refused_in_the_api():
    with pytest.raises(ValueError, match=r"affinity of 'b' onto 'a' must be a finite number, got 10000+\.\.\.$"):
        select_groups({"a": {"a": 0, "b": 10**400}, "b": {"a": 1, "b": 0}}, None, 1)


def test_binary_file_is_named(tmp_path):
    (tmp_path / "a.json").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(128, 256)))
    _fails(tmp_path / "a.json", r"a\.json: holds NUL bytes \(a binary file\?\)")
    (tmp_path / "a.json").write_bytes(b"\xc3\x28{}")
    _fails(tmp_path / "a.json", r"a\.json: not UTF-8 text \(byte 0 is 0xc3\)")


def test_oversized_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_TEXT_BYTES", 100)
    (tmp_path / "a.json").write_text(json.dumps(GOOD) + " " * 100)
    _fails(tmp_path / "a.json", r"a\.json: larger than 100 bytes; expected a JSON object")


def test_directory_and_missing_file_are_named(tmp_path):
    (tmp_path / "d.json").mkdir()
    _fails(tmp_path / "d.json", r"d\.json: is a directory; expected a JSON object")
    _fails(tmp_path / "none.json", r"none\.json: no such file; expected a JSON object", FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        load_affinity(tmp_path / "none.json")


def test_cli_prints_one_error_line_for_deep_nesting(tmp_path):
    (tmp_path / "a.json").write_text("[" * 100_000 + "]" * 100_000)
    res = CliRunner().invoke(app, ["tag-select", "--affinity", str(tmp_path / "a.json"), "--groups", "2"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and "a.json: JSON nested more than 8 levels deep" in res.stderr
    assert res.stderr.count("\n") == 1
