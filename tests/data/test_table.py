"""Tables in (``data.name=table``): wide and long CSV / Parquet files become the same TaskData the npz
loader gives; features standardised / one-hot on the training split only; seeded splits reproducible
and stratified by task; every bad table is one clear error line (a ``ValueError`` or
``FileNotFoundError``, which the CLI prints as ``error: ...`` with exit status 2)."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from taskgrouping.data.registry import available_datasets, load_dataset
from taskgrouping.data.table import seeded_split

SMALL = ["--set", "train.epochs=2", "--set", "train.progress=false", "--set", "train.batch_size=16"]


def _wide(tmp_path, n=30, name="w.csv", **columns):
    """A wide table: numeric x1, categorical city, binary y_bin (row 4 empty), regression y_reg."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x1": rng.normal(size=n), "city": rng.choice(["ams", "ber", "cph"], n),
                       "y_bin": rng.integers(0, 2, n).astype(float), "y_reg": rng.normal(size=n) * 3 + 1})
    df.loc[4, "y_bin"] = np.nan
    for k, v in columns.items():
        df[k] = v
    path = tmp_path / name
    df.to_parquet(path) if name.endswith(".parquet") else df.to_csv(path, index=False)
    return path, df


def _long(tmp_path, sizes=(("s1", 20), ("s2", 15), ("s3", 25)), name="l.csv"):
    """A long table: rows of task s2 are 0/1, the others real; features age (numeric) and sex."""
    rng = np.random.default_rng(1)
    rows = []
    for task, m in sizes:
        for _ in range(m):
            rows.append({"age": rng.normal(40, 10), "sex": rng.choice(["f", "m"]), "task": task,
                         "y": float(rng.integers(0, 2)) if task == "s2" else rng.normal()})
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)  # tasks interleaved
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path, df


def _labelled(y):
    return (y >= 0) if y.dtype == torch.int64 else ~torch.isnan(y).reshape(-1)


def test_table_is_listed_with_the_datasets():
    loaders = available_datasets()
    assert "table" in loaders and "CSV or Parquet" in loaders["table"].__doc__.splitlines()[0]


def test_wide_form_shapes_types_and_missing_labels(tmp_path):
    path, df = _wide(tmp_path)
    data = load_dataset("table", path=str(path), targets=["y_bin", "y_reg"])
    assert [(t.name, t.kind) for t in data.tasks] == [("y_bin", "binary"), ("y_reg", "regression")]
    assert [len(data.train), len(data.val), len(data.test)] == [18, 6, 6]  # 60/20/20 of 30
    n_cats = df["city"].nunique()
    assert data.input_shape == (1 + n_cats,) and data.train.x.dtype == torch.float32
    ys = torch.cat([s.targets["y_bin"] for s in (data.train, data.val, data.test)])
    assert ys.dtype == torch.int64 and int((ys == -1).sum()) == 1  # the empty cell of row 4
    yr = torch.cat([s.targets["y_reg"] for s in (data.train, data.val, data.test)])
    assert yr.shape == (30, 1) and yr.dtype == torch.float32
    # the rows are kept whole: the multiset of regression targets is the column's
    np.testing.assert_allclose(np.sort(yr.numpy().ravel()), np.sort(df["y_reg"].to_numpy()), rtol=1e-6)
    assert data.info["form"] == "wide" and data.info["features"] == ["x1", "city"]


def test_standardised_and_one_hot_on_the_training_split_only(tmp_path):
    # by hand: train rows 0-3, val rows 4-5, test rows 6-7; city "osl" is never seen in training
    df = pd.DataFrame({
        "x1": [1.0, 2.0, 3.0, 6.0, 10.0, -2.0, 0.0, 4.0],
        "const": [5.0] * 8,
        "city": ["ams", "ber", "ams", "cph", "osl", "ber", "cph", "ams"],
        "y": [0.5, 1.5, 2.0, 3.0, 1.0, 0.0, 2.0, 1.0],
        "fold": ["train"] * 4 + ["val"] * 2 + ["test"] * 2,
    })
    df = pd.concat([df] * 3, ignore_index=True)  # every split needs 3 labelled rows
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    data = load_dataset("table", path=str(path), targets=["y"], split_column="fold")
    train_x1 = np.array([1.0, 2.0, 3.0, 6.0] * 3)
    mean, std = train_x1.mean(), train_x1.std()  # 3.0 and sqrt(3.5): population std, as StandardScaler
    assert (mean, std) == (3.0, np.sqrt(3.5))
    onehot = {"ams": [1, 0, 0], "ber": [0, 1, 0], "cph": [0, 0, 1], "osl": [0, 0, 0]}  # sorted categories
    for split, rows in (("train", [0, 1, 2, 3]), ("val", [4, 5]), ("test", [6, 7])):
        rows = [r + 8 * k for k in range(3) for r in rows]
        expect = np.array([[(df.x1[r] - mean) / std, 0.0, *onehot[df.city[r]]] for r in rows])
        np.testing.assert_allclose(getattr(data, split).x.numpy(), expect, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(getattr(data, split).targets["y"].numpy().ravel(), df.y[rows], rtol=1e-7)
    assert data.info["inputs"] == 5 and data.info["categorical"] == ["city"]


def test_long_form_one_task_labelled_per_row(tmp_path):
    path, df = _long(tmp_path)
    data = load_dataset("table", path=str(path), task_column="task", target="y")
    assert data.task_names == list(dict.fromkeys(df["task"]))  # order of first appearance
    assert {t.name: t.kind for t in data.tasks} == {"s1": "regression", "s2": "binary", "s3": "regression"}
    assert len(data.train) + len(data.val) + len(data.test) == len(df)
    for split in (data.train, data.val, data.test):
        mask = torch.stack([_labelled(split.targets[t]) for t in data.task_names], dim=1)
        assert bool((mask.sum(dim=1) == 1).all())  # exactly one task labelled on every row
    assert data.info["form"] == "long" and data.info["features"] == ["age", "sex"]


def test_long_form_rows_keep_their_task_and_label(tmp_path):
    df = pd.DataFrame({"f": np.arange(30.0), "task": ["p", "q", "r"] * 10, "y": np.arange(30.0) / 10,
                       "split": (["train"] * 4 + ["val"] * 3 + ["test"] * 3) * 3})
    path = tmp_path / "l.csv"
    df.to_csv(path, index=False)
    data = load_dataset("table", path=str(path), task_column="task", target="y", split_column="split")
    for name in ("train", "val", "test"):
        rows = df.index[df.split == name]
        split = getattr(data, name)
        for j, t in enumerate(["p", "q", "r"]):
            y = split.targets[t].numpy().ravel()
            own = (df.task[rows] == t).to_numpy()
            np.testing.assert_allclose(y[own], df.y[rows][own], rtol=1e-6)
            assert np.isnan(y[~own]).all()


def test_seeded_split_is_reproducible_and_stratified(tmp_path):
    path, df = _long(tmp_path, sizes=(("s1", 20), ("s2", 15), ("s3", 26)))
    a = load_dataset("table", path=str(path), task_column="task", target="y", seed=3)
    b = load_dataset("table", path=str(path), task_column="task", target="y", seed=3)
    c = load_dataset("table", path=str(path), task_column="task", target="y", seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.train.x, c.train.x)
    for task, n in (("s1", 20), ("s2", 15), ("s3", 26)):
        counts = [int(_labelled(getattr(a, s).targets[task]).sum()) for s in ("train", "val", "test")]
        assert counts == [round(0.6 * n), round(0.2 * n), n - round(0.6 * n) - round(0.2 * n)], task
    # the index sets are disjoint and cover every row; each stratum is cut 60/20/20 on its own
    strata = [np.arange(0, 10), np.arange(10, 15), np.arange(15, 35)]
    parts = seeded_split(strata, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(35))
    assert [sum(int(np.isin(s, p).sum()) for s in strata[:1]) for p in parts] == [6, 2, 2]
    assert all(np.array_equal(p, q) for p, q in zip(parts, seeded_split(strata, seed=0)))


def test_task_types_given_or_inferred(tmp_path):
    path, _ = _wide(tmp_path, y_int=np.tile([0, 1, 2], 10))
    data = load_dataset("table", path=str(path), targets=["y_bin", "y_int"], task_types={"y_bin": "regression"})
    assert [t.kind for t in data.tasks] == ["regression", "regression"]
    assert torch.isnan(torch.cat([data.train.targets["y_bin"], data.val.targets["y_bin"],
                                  data.test.targets["y_bin"]])).sum() == 1  # the missing label stays NaN


def test_bool_target_and_feature_read_as_numbers(tmp_path):
    path, _ = _wide(tmp_path, flag=[True, False] * 15, label=[False, True, True] * 10)
    data = load_dataset("table", path=str(path), targets=["label"], features=["flag", "x1"])
    assert data.tasks[0].kind == "binary" and data.input_shape == (2,)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None,
                    reason="pyarrow is not installed (pip install 'taskgrouping[test]' installs it)")
def test_parquet_reads_like_csv(tmp_path):
    pq, _ = _wide(tmp_path, name="w.parquet")
    csv, _ = _wide(tmp_path, name="w.csv")
    a = load_dataset("table", path=str(pq), targets=["y_bin", "y_reg"])
    b = load_dataset("table", path=str(csv), targets=["y_bin", "y_reg"])
    assert torch.allclose(a.train.x, b.train.x, atol=1e-6)
    assert torch.equal(a.test.targets["y_bin"], b.test.targets["y_bin"])


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(ValueError, match=r'pyarrow.*pip install "taskgrouping\[parquet\]"'):
        load_dataset("table", path=str(path), targets=["y"])


def _error(tmp_path, frame, **options):
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_dataset("table", path=str(path), **options)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _frame(n=30):
    rng = np.random.default_rng(2)
    return pd.DataFrame({"x": rng.normal(size=n), "y": rng.integers(0, 2, n), "z": rng.normal(size=n),
                         "task": ["a", "b"] * (n // 2)})


BAD = {
    "missing target column": (dict(targets=["y", "nope"]), "data.targets names column 'nope', which the table lacks"),
    "missing feature column": (dict(targets=["y"], features=["x", "age"]), "data.features names column 'age'"),
    "missing task column": (dict(task_column="group", target="y"), "data.task_column names column 'group'"),
    "missing split column": (dict(targets=["y"], split_column="fold"), "data.split_column names column 'fold'"),
    "feature is a target": (dict(targets=["y"], features=["x", "y"]), "data.features names ['y']"),
    "neither form": (dict(features=["x"]), "needs either data.targets"),
    "both forms": (dict(targets=["y"], task_column="task", target="z"), "not both"),
    "long form without target": (dict(task_column="task"), "needs both data.task_column and data.target"),
    "unknown task type key": (dict(targets=["y"], task_types={"q": "binary"}), "unknown task(s) ['q']"),
    "unknown task type": (dict(targets=["y"], task_types={"y": "multiclass"}),
                          "task 'y' has type 'multiclass'; expected one of ['binary', 'regression']"),
    "binary declared, not 0/1": (dict(targets=["z"], task_types={"z": "binary"}), "task 'z' is binary but has label"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_are_one_clear_line(tmp_path, case):
    options, expected = BAD[case]
    assert expected in _error(tmp_path, _frame(), **options)


def test_non_numeric_target(tmp_path):
    frame = _frame()
    frame["y"] = frame["y"].astype(object)
    frame.loc[7, "y"] = "yes"
    msg = _error(tmp_path, frame, targets=["y"])
    assert "target column 'y' holds non-numeric value 'yes' at data row 8; expected numbers" in msg


def test_too_few_rows_per_split_names_the_task(tmp_path):
    frame = pd.concat([_frame(30), _frame(10).assign(task="tiny")], ignore_index=True)
    msg = _error(tmp_path, frame, task_column="task", target="y")
    assert ("task 'tiny' has 2 labelled row(s) in the val split (train 6, val 2, test 2 with the seeded 60/20/20 "
            "split stratified by task); expected at least 3") in msg


def test_too_few_labels_in_the_wide_form(tmp_path):
    frame = _frame()
    frame.loc[3:, "z"] = np.nan  # only 3 labels of z left
    msg = _error(tmp_path, frame, targets=["y", "z"])
    assert "task 'z' has" in msg and "expected at least 3 in each split" in msg


def test_bad_split_value(tmp_path):
    frame = _frame().assign(fold=["train"] * 18 + ["validation"] * 6 + ["test"] * 6)
    msg = _error(tmp_path, frame, targets=["y"], split_column="fold")
    assert "split column 'fold' holds 'validation' at data row 19; expected one of ['train', 'val', 'test']" in msg


def test_missing_feature_value(tmp_path):
    frame = _frame()
    frame.loc[5, "x"] = np.nan
    msg = _error(tmp_path, frame, targets=["y"])
    assert "feature column 'x' has 1 missing value(s) (the first at data row 6)" in msg


def test_empty_task_and_target_cells_in_the_long_form(tmp_path):
    frame = _frame()
    frame.loc[2, "task"] = None
    assert "task column 'task' is empty at data row 3" in _error(tmp_path, frame, task_column="task", target="y")
    frame = _frame()
    frame["y"] = frame["y"].astype(float)
    frame.loc[4, "y"] = np.nan
    assert "target column 'y' is empty at data row 5" in _error(tmp_path, frame, task_column="task", target="y")


def test_unknown_extension_and_missing_file(tmp_path):
    path = tmp_path / "t.xlsx"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match=r"unknown table format '\.xlsx'; expected one of \['\.csv'"):
        load_dataset("table", path=str(path), targets=["y"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("table", path=str(tmp_path / "none.csv"), targets=["y"])


@pytest.mark.parametrize("content", [b"a,b\n1,2\n\xff\xfe\x00,\"unterminated\n", b"a,b\n1,2,3,4\n5,6\n",
                                     b"a,b\n1,2\n3,4,5\n", b""])
def test_unreadable_csv(tmp_path, content):
    # a first row longer than the header would silently become pandas' index: refused like the others
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: (not a readable CSV file|the file is empty)"):
        load_dataset("table", path=str(path), targets=["b"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "taskgrouping.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_runs_a_long_table(tmp_path):
    path, _ = _long(tmp_path, sizes=(("s1", 40), ("s2", 30), ("s3", 40)))
    out = tmp_path / "run"
    proc = _cli("run", "--set", "data.name=table", "--set", f"data.path={path}", "--set", "data.task_column=task",
                "--set", "data.target=y", "--set", "methods=[naive_mtl,single_task]", "--set", "K=2",
                "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["dataset"]["tasks"]) == ["s1", "s2", "s3"] and res["dataset"]["info"]["form"] == "long"
    assert set(res["methods"]) == {"naive_mtl", "single_task"}
    for m in res["methods"].values():
        assert set(m["per_task"]) == {"s1", "s2", "s3"}
        assert all(np.isfinite(v["loss"]) for v in m["per_task"].values())


def test_label_clusters_refuses_a_long_table(tmp_path):
    """No row of a long table labels two tasks, so there is no label correlation to cluster."""
    from taskgrouping.methods.base import method_options

    path, _ = _long(tmp_path)
    data = load_dataset("table", path=str(path), task_column="task", target="y")
    with pytest.raises(ValueError, match="label_clusters needs tasks labelled on the same samples"):
        method_options("label_clusters", None).check_data(data)
    wide = load_dataset("table", path=str(_long(tmp_path, name="w.csv")[0]), targets=["y"])
    method_options("label_clusters", None).check_data(wide)  # the wide form is fine
