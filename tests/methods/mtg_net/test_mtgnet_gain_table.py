"""MTG-Net gain tables: the authors' measured gains load with their documented shapes, answer the file's
rows, and bad gain files are reported with file, line and reason."""

from __future__ import annotations

import numpy as np
import pytest

from mtgnet_cases import ROOT, load_table
from taskgrouping.methods.mtg_net import GainTable, load_mtgnet_gains


def test_tables_load_with_documented_shapes():
    taskonomy, ett = load_table("taskonomy"), load_table("ett")
    assert taskonomy.tasks == ("s", "d", "n", "k", "e") and len(taskonomy) == 31
    assert len(ett) == 127 and ett.n_tasks == 7
    mimic = load_mtgnet_gains(ROOT, "mimic27", "test")
    assert len(mimic) == 3185 and mimic.n_tasks == 27
    sizes = mimic.masks.sum(axis=1)
    assert (sizes == 1).sum() == 27 and (sizes == 2).sum() == 351  # README: 27 singles, all 351 pairs
    for t in (taskonomy, ett, mimic):
        assert np.all(t.gains[t.masks.sum(axis=1) == 1] == 0.0)


def test_table_answers_the_file_row():
    taskonomy = load_table("taskonomy")
    # README: rows = 5 singles, then the pairs in lexicographic column order -> row 6 (1-based) = {s, d}
    line = (ROOT / "taskonomy" / "taskonomy.csv").read_text().splitlines()[5].split()
    assert taskonomy(("d", "s")) == {"s": float(line[0]), "d": float(line[1])}
    assert taskonomy.total(["s", "d"]) == pytest.approx(float(line[0]) + float(line[1]))
    assert taskonomy(("n",)) == {"n": 0.0}


def test_table_query_errors():
    taskonomy = load_table("taskonomy")
    mimic = load_mtgnet_gains(ROOT, "mimic27", "valid")
    with pytest.raises(ValueError, match="unknown tasks"):
        taskonomy(("s", "x"))
    with pytest.raises(ValueError, match="not measured"):
        mimic(mimic.tasks[:3])
    with pytest.raises(ValueError, match="unknown MTG-Net dataset"):
        load_mtgnet_gains(ROOT, "nyu")
    with pytest.raises(ValueError, match="no 'test' gains"):
        load_mtgnet_gains(ROOT, "taskonomy", "test")


def _write(path, rows, sep=" "):
    path.write_text("\n".join(sep.join(str(v) for v in r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("masks, gains, words", [
    ([[1, 0], [0, 1], [1, 1, 0]], [[0, 0], [0, 0], [1, 1]], ["x.csv:3", "3 columns"]),
    ([[1, 0], [0, 1]], [[0, 0], [0, 0], [1, 1]], ["y.csv", "3 rows", "has 2"]),
    ([[1, 0], [0, 1], [1, 1]], [[0, 0, 0], [0, 0, 0], [1, 1, 1]], ["y.csv", "3 columns", "has 2"]),
    ([[1, 0], [0, 2], [1, 1]], [[0, 0], [0, 0], [1, 1]], ["mask row 1", "'b'", "0/1"]),
    ([[1, 0], [0, 1], [1, 1]], [[0, 0.5], [0, 0], [1, 1]], ["row 0", "'b'", "not in that combination"]),
    ([[1, 0], [1, 0], [1, 1]], [[0, 0], [0, 0], [1, 1]], ["rows 0 and 1", "same combination"]),
    ([[1, 0], [0, 0], [1, 1]], [[0, 0], [0, 0], [1, 1]], ["mask row 1", "no task"]),
])
def test_bad_gain_files(tmp_path, masks, gains, words):
    x = _write(tmp_path / "x.csv", masks, sep=",")
    y = _write(tmp_path / "y.csv", gains)
    with pytest.raises(ValueError) as err:
        GainTable.load(x, y, ["a", "b"])
    for w in words:
        assert w in str(err.value)


def test_bad_gain_files_header_missing_and_names(tmp_path):
    x = _write(tmp_path / "x.csv", [[1, 0], [0, 1]])
    y = tmp_path / "y.csv"
    y.write_text("a b\n0 0\n0 0\n")
    with pytest.raises(ValueError, match=r"y.csv:1: expected numbers only"):
        GainTable.load(x, y)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        GainTable.load(x, tmp_path / "nope.csv")
    _write(y, [[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="2 task columns but 3 task names"):
        GainTable.load(x, y, ["a", "b", "c"])
    assert GainTable.load(x, y).tasks == ("t0", "t1")
