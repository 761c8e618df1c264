"""Hostile MTG-Net gain files: missing, directory, binary, oversized or malformed mask / gain files are
each one ``ValueError`` / ``FileNotFoundError`` line naming the file."""

from __future__ import annotations

import pytest

import taskgrouping.readers as readers
from taskgrouping.methods.mtg_net import GainTable, load_mtgnet_gains

MASKS = "1,0\n0,1\n1,1\n"
GAINS = "0,0\n0,0\n0.1,-0.2\n"


def _pair(tmp_path, masks=MASKS, gains=GAINS):
    for name, text in (("x.csv", masks), ("y.csv", gains)):
        if isinstance(text, bytes):
            (tmp_path / name).write_bytes(text)
        else:
            (tmp_path / name).write_text(text)
    return tmp_path / "x.csv", tmp_path / "y.csv"


def _fails(mask, gain, match, exc=ValueError):
    with pytest.raises(exc, match=match) as info:
        GainTable.load(mask, gain)
    assert "\n" not in str(info.value)


def test_a_good_pair_still_loads(tmp_path):
    table = GainTable.load(*_pair(tmp_path))
    assert table(("t0", "t1")) == {"t0": 0.1, "t1": -0.2}


def test_missing_files_and_directories_are_named(tmp_path):
    mask, gain = _pair(tmp_path)
    _fails(tmp_path / "none.csv", gain, r"none\.csv: no such file; expected a table of numbers", FileNotFoundError)
    (tmp_path / "dir.csv").mkdir()
    _fails(mask, tmp_path / "dir.csv", r"dir\.csv: is a directory; expected a table of numbers")
    with pytest.raises(FileNotFoundError, match=r"taskonomy_x\.csv: no such file"):
        load_mtgnet_gains(tmp_path, "taskonomy")
    with pytest.raises(ValueError, match=r"x\.csv/taskonomy/taskonomy_x\.csv: cannot be read \(Not a directory\)"):
        load_mtgnet_gains(mask, "taskonomy")


@pytest.mark.parametrize("gains, match", [
    (b"\x00\x01\x02", r"y\.csv: holds NUL bytes"),
    (b"\xff\xfe0,0\n", r"y\.csv: not UTF-8 text \(byte 0 is 0xff\)"),
    ("", r"y\.csv: the file holds no rows; expected a table of numbers"),
    ("a,b\n0,0\n0,0\n0.1,0.2\n", r"y\.csv:1: expected numbers only \(no header\)"),
    ("0,0\n0\n0.1,0.2\n", r"y\.csv:2: 1 columns, but the first row has 2"),
    ("0,0\n0,0\nnan,0.2\n", r"y\.csv \(masks .*x\.csv\): gain row 2, task 't0' is not finite"),
    (",".join(["0"] * 63) + "\n", r"y\.csv:1: 63 columns; at most 62 tasks are supported"),
])
def test_malformed_gain_files_are_named(tmp_path, gains, match):
    _fails(*_pair(tmp_path, gains=gains), match)


def test_malformed_mask_file_is_named(tmp_path):
    _fails(*_pair(tmp_path, masks="1,0\n0,1\n1,2\n"), r"mask row 2, task 't1' is 2\.0; masks must be 0/1")


def test_oversized_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_TEXT_BYTES", 8)
    _fails(*_pair(tmp_path), r"x\.csv: larger than 8 bytes")
