"""A user's table (``data.name=table``, ``data.path=FILE``): a ``.csv`` (or ``.csv.gz``) read by pandas,
or a ``.parquet`` file (needs pyarrow: ``pip install "taskgrouping[parquet]"``).

Two layouts:

* **wide** (``data.targets: [col, ...]``): one row per sample, one label column per task; an empty
  cell is a missing label of that task;
* **long** (``data.task_column`` + ``data.target``): one row per sample *of one task* (schools and
  pupils, fields and sensor readings): the row's task is the value of ``task_column`` (as a string;
  tasks in order of first appearance) and its label the value of ``target``; every other task's
  label is missing for that row.

Inputs are ``data.features`` (default: every column that is not a target, the task column or the
split column). Numeric (and true/false) columns are standardised with the mean and the standard
deviation (``ddof=0``; 1 for a constant column) of the training split; other columns are
categories, one-hot encoded over the categories seen in the training split (a category first seen
in val or test encodes as all zeros). Nothing is imputed: a missing feature value is an error
naming the column and the row, so that no input is invented silently.

Splits: ``data.split_column`` (values ``train`` / ``val`` / ``test``), else a random 60/20/20 split
drawn from ``data.seed`` (default 0, independent of the run's seed so runs at several seeds share
one split), stratified by task in the long form (each task's rows are split 60/20/20 on their own).
Every task needs at least :data:`MIN_ROWS` labelled rows in each split.

Task types: ``data.task_types`` (``{task: binary | regression}``) or inferred from the labels (all
0/1 -> ``binary``, else ``regression``). Targets must be numbers; regression targets are used as
given (not standardised), so losses and errors are in the table's units.

Errors name the file, and where it helps the column, task, value and *data row* (1-based, counted
after the header: line ``row + 1`` of a CSV file).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.data.checks import check_allocation
from taskgrouping.data.registry import register_dataset
from taskgrouping.option_values import short_repr
from taskgrouping.tasks import Task

if TYPE_CHECKING:  # pandas is imported when a table is read: listing the datasets stays fast
    import pandas as pd

__all__ = ["table", "read_table", "infer_task_type", "seeded_split", "encode_features", "MIN_ROWS", "FRACTIONS",
           "PARQUET_HINT"]

SPLITS = ("train", "val", "test")
#: Fractions of the seeded train / val / test split.
FRACTIONS = (0.6, 0.2, 0.2)
#: Labelled rows every task needs in each split (fewer give no usable validation / test score).
MIN_ROWS = 3
TABLE_TASK_TYPES = ("binary", "regression")
PARQUET_HINT = 'pip install "taskgrouping[parquet]"'
_CSV_SUFFIXES = (".csv", ".csv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def read_table(file: Path) -> pd.DataFrame:
    """The table in ``file`` (CSV or Parquet by its extension) with string column names; a one-line
    ``ValueError`` naming the file when it cannot be read."""
    import pandas as pd

    name = file.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        if importlib.util.find_spec("pyarrow") is None:
            raise ValueError(f"{file}: reading Parquet needs pyarrow, which is not installed; {PARQUET_HINT}")
        try:
            frame = pd.read_parquet(file, engine="pyarrow")
        except (ValueError, OSError, TypeError) as exc:
            raise ValueError(f"{file}: not a readable Parquet file ({' '.join(str(exc).split())})") from None
    elif name.endswith(_CSV_SUFFIXES):
        try:
            with warnings.catch_warnings():  # rows longer than the header: an error, not a silent index
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(file, low_memory=False, index_col=False)
        except pd.errors.EmptyDataError:
            raise ValueError(f"{file}: the file is empty; expected a header line and rows") from None
        except (ValueError, OSError, pd.errors.ParserError, pd.errors.ParserWarning) as exc:
            raise ValueError(f"{file}: not a readable CSV file ({' '.join(str(exc).split())})") from None
    else:
        raise ValueError(f"{file}: unknown table format {file.suffix or '(no extension)'!r}; expected one of "
                         f"{list(_CSV_SUFFIXES + _PARQUET_SUFFIXES)}")
    frame.columns = [str(c) for c in frame.columns]
    repeated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if repeated:
        raise ValueError(f"{file}: column name(s) {repeated} appear more than once; expected unique names")
    if len(frame) == 0:
        raise ValueError(f"{file}: the table has no rows; expected one row per sample")
    return frame


def _names(value: str | Sequence[str] | None) -> list[str] | None:
    return None if value is None else [value] if isinstance(value, str) else [str(v) for v in value]


def _columns_list(frame: pd.DataFrame) -> str:
    return short_repr(list(frame.columns), 200)


def _need_columns(file: Path, frame: pd.DataFrame, key: str, names: Sequence[str]) -> None:
    for n in names:
        if n not in frame.columns:
            raise ValueError(f"{file}: {key} names column {n!r}, which the table lacks; its columns are "
                             f"{_columns_list(frame)}")


def _numeric_target(file: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    """Column ``column`` as float64 (NaN = missing); non-numbers and infinities are errors."""
    import pandas as pd

    raw = frame[column]
    if pd.api.types.is_bool_dtype(raw.dtype) or pd.api.types.is_numeric_dtype(raw.dtype):
        values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        coerced = pd.to_numeric(raw, errors="coerce")
        bad = raw.notna().to_numpy() & coerced.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{file}: target column {column!r} holds non-numeric value {short_repr(raw.iloc[i])} at "
                             f"data row {i + 1}; expected numbers (0/1 for binary tasks; empty = missing label)")
        values = coerced.astype("float64").to_numpy(na_value=np.nan)
    inf = np.isinf(values)
    if inf.any():
        i = int(np.flatnonzero(inf)[0])
        raise ValueError(f"{file}: target column {column!r} holds {values[i]} at data row {i + 1}; expected finite "
                         "numbers")
    return values


def infer_task_type(labels: np.ndarray) -> str:
    """``binary`` when every label (NaN = missing, ignored) is 0 or 1, else ``regression``."""
    seen = labels[~np.isnan(labels)]
    return "binary" if seen.size and np.isin(seen, (0.0, 1.0)).all() else "regression"


def seeded_split(strata: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """Row indices of the train / val / test splits (each sorted): every stratum (an array of row
    indices) is shuffled by one ``numpy`` generator seeded with ``seed``, in the given order, and cut
    ``round(0.6 n)`` / ``round(0.2 n)`` / the rest."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for rows in strata:
        rows = np.asarray(rows, dtype=np.int64)
        perm = rows[rng.permutation(rows.size)]
        n_train = int(np.floor(FRACTIONS[0] * rows.size + 0.5))
        n_val = int(np.floor(FRACTIONS[1] * rows.size + 0.5))
        for part, chunk in zip(parts, (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:])):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _column_split(file: Path, frame: pd.DataFrame, column: str) -> list[np.ndarray]:
    values = frame[column].astype("object").to_numpy()
    names = np.array([v.strip() if isinstance(v, str) else v for v in values], dtype=object)
    for i, v in enumerate(names):
        if not isinstance(v, str) or v not in SPLITS:
            raise ValueError(f"{file}: split column {column!r} holds {short_repr(values[i])} at data row {i + 1}; "
                             f"expected one of {list(SPLITS)}")
    return [np.flatnonzero(names == s) for s in SPLITS]


def _feature_kinds(file: Path, frame: pd.DataFrame, columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(numeric columns, categorical columns); missing values and infinities are errors."""
    import pandas as pd

    numeric, categorical = [], []
    for c in columns:
        col = frame[c]
        missing = col.isna().to_numpy()
        if missing.any():
            raise ValueError(f"{file}: feature column {c!r} has {int(missing.sum())} missing value(s) (the first at "
                             f"data row {int(np.flatnonzero(missing)[0]) + 1}); expected complete features (fill or "
                             "drop those rows, or leave the column out of data.features)")
        dtype = col.dtype
        if pd.api.types.is_bool_dtype(dtype) or (pd.api.types.is_numeric_dtype(dtype)
                                                 and not pd.api.types.is_complex_dtype(dtype)):
            values = col.to_numpy(dtype=np.float64)
            inf = np.isinf(values)
            if inf.any():
                i = int(np.flatnonzero(inf)[0])
                raise ValueError(f"{file}: feature column {c!r} holds {values[i]} at data row {i + 1}; expected "
                                 "finite numbers")
            numeric.append(c)
        elif (isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype)
              or pd.api.types.is_object_dtype(dtype)):
            categorical.append(c)
        else:
            raise ValueError(f"{file}: feature column {c!r} has dtype {dtype}; expected numbers or categories "
                             "(strings), or leave the column out of data.features")
    return numeric, categorical


def encode_features(frame: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str],
                    splits: Sequence[np.ndarray], where: str = "the table") -> tuple[list[np.ndarray], list[str]]:
    """The input matrix (float32) of each split and the names of its columns: ``numeric`` columns
    standardised and ``categorical`` ones one-hot encoded (scikit-learn's ``StandardScaler`` and
    ``OneHotEncoder(handle_unknown="ignore")``), both fitted on the first split (the training rows)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    parts = []
    if numeric:
        parts.append(("num", StandardScaler(), list(numeric)))
    if categorical:
        parts.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float64),
                      list(categorical)))
    inputs = frame[list(numeric) + list(categorical)].copy()
    for c in numeric:
        inputs[c] = inputs[c].astype(np.float64)
    for c in categorical:
        inputs[c] = inputs[c].astype(str).astype(object)
    train = inputs.iloc[splits[0]]
    width = len(numeric) + sum(int(train[c].nunique()) for c in categorical)
    check_allocation(f"{where}: encoding {len(frame)} rows into {width} input columns", 12 * len(frame) * width)
    transformer = ColumnTransformer(parts, remainder="drop", sparse_threshold=0.0)
    transformer.fit(train)
    names = [str(n) for n in transformer.get_feature_names_out()]
    return [np.asarray(transformer.transform(inputs.iloc[rows]), dtype=np.float32) for rows in splits], names


def _check_counts(file: Path, names: Sequence[str], labels: np.ndarray, splits: Sequence[np.ndarray],
                  how: str) -> None:
    for j, n in enumerate(names):
        counts = [int((~np.isnan(labels[rows, j])).sum()) for rows in splits]
        for split, c in zip(SPLITS, counts):
            if c < MIN_ROWS:
                raise ValueError(f"{file}: task {n!r} has {c} labelled row(s) in the {split} split (train {counts[0]}, "
                                 f"val {counts[1]}, test {counts[2]} with {how}); expected at least {MIN_ROWS} in each "
                                 "split (add rows, or set data.split_column)")


def _targets(file: Path, name: str, kind: str, labels: np.ndarray) -> torch.Tensor:
    if kind == "binary":
        bad = ~np.isnan(labels) & ~np.isin(labels, (0.0, 1.0))
        if bad.any():
            raise ValueError(f"{file}: task {name!r} is binary but has label {float(labels[bad][0])!r}; expected 0, 1 "
                             "or an empty cell (missing)")
        return torch.from_numpy(np.where(np.isnan(labels), -1, labels).astype(np.int64))
    return torch.from_numpy(labels.astype(np.float32)[:, None])


@register_dataset("table")
def table(path: str | None = None, targets: str | Sequence[str] | None = None, task_column: str | None = None,
          target: str | None = None, features: str | Sequence[str] | None = None, split_column: str | None = None,
          task_types: Mapping[str, str] | None = None, seed: int = 0) -> TaskData:
    """A CSV or Parquet table, wide (data.targets) or long (data.task_column + data.target); see the module docstring."""
    if not path:
        raise ValueError("data.path is required for data.name=table (a .csv or .parquet file)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.path {str(file)!r} does not exist; expected a .csv or .parquet file")
    wide, long = targets is not None, task_column is not None or target is not None
    if wide == long:
        raise ValueError("data.name=table needs either data.targets (wide form: one label column per task) or "
                         "data.task_column and data.target (long form: one row per sample of one task)"
                         + (", not both" if wide else ""))
    if long and (task_column is None or target is None):
        raise ValueError(f"data.name=table in the long form needs both data.task_column and data.target; "
                         f"got only data.{'task_column' if target is None else 'target'}")
    frame = read_table(file)

    label_cols = _names(targets) if wide else [str(target)]
    if wide and not label_cols:
        raise ValueError("data.targets is empty; expected the label columns, one task each")
    if len(set(label_cols)) != len(label_cols):
        raise ValueError(f"data.targets names a column twice: {label_cols}")
    _need_columns(file, frame, "data.targets" if wide else "data.target", label_cols)
    if long:
        _need_columns(file, frame, "data.task_column", [str(task_column)])
        if str(task_column) == str(target):
            raise ValueError(f"data.task_column and data.target are both {str(target)!r}; expected two columns")
    if split_column is not None:
        _need_columns(file, frame, "data.split_column", [str(split_column)])
    reserved = set(label_cols) | ({str(task_column)} if long else set()) | (
        {str(split_column)} if split_column is not None else set())
    if features is None:
        feature_cols = [c for c in frame.columns if c not in reserved]
        if not feature_cols:
            raise ValueError(f"{file}: no feature columns left (the table has only {_columns_list(frame)}); expected "
                             "input columns besides the targets, task and split columns")
    else:
        feature_cols = _names(features)
        if not feature_cols:
            raise ValueError("data.features is empty; expected the input columns (or leave it out: every other "
                             "column)")
        if len(set(feature_cols)) != len(feature_cols):
            raise ValueError(f"data.features names a column twice: {feature_cols}")
        _need_columns(file, frame, "data.features", feature_cols)
        clash = [c for c in feature_cols if c in reserved]
        if clash:
            raise ValueError(f"data.features names {clash}, which are target, task or split columns; expected input "
                             "columns only")

    # labels: rows x tasks, NaN = missing
    if wide:
        names = list(label_cols)
        labels = np.stack([_numeric_target(file, frame, c) for c in label_cols], axis=1)
        strata = [np.arange(len(frame))]
    else:
        raw_tasks = frame[str(task_column)]
        empty = raw_tasks.isna().to_numpy()
        if empty.any():
            raise ValueError(f"{file}: task column {str(task_column)!r} is empty at data row "
                             f"{int(np.flatnonzero(empty)[0]) + 1}; expected a task name on every row")
        row_task = raw_tasks.astype(str).to_numpy(dtype=object)
        names = list(dict.fromkeys(row_task.tolist()))
        values = _numeric_target(file, frame, str(target))
        unlabelled = np.isnan(values)
        if unlabelled.any():
            raise ValueError(f"{file}: target column {str(target)!r} is empty at data row "
                             f"{int(np.flatnonzero(unlabelled)[0]) + 1}; expected a label on every row of the long "
                             "form")
        # the TaskData holds one target per task for every row: rows x tasks labels, then one tensor per task
        check_allocation(f"{file}: the labels of {len(frame)} rows x {len(names)} tasks", 16 * len(frame) * len(names))
        index = {n: j for j, n in enumerate(names)}
        col = np.array([index[t] for t in row_task], dtype=np.int64)
        labels = np.full((len(frame), len(names)), np.nan)
        labels[np.arange(len(frame)), col] = values
        order = np.argsort(col, kind="stable")  # each task's rows, in file order
        strata = np.split(order, np.searchsorted(col[order], np.arange(1, len(names))))

    given = dict(task_types or {})
    unknown = [k for k in given if k not in names]
    if unknown:
        raise ValueError(f"data.task_types names unknown task(s) {unknown}; the tasks are {short_repr(names, 200)}")
    kinds = [str(given.get(n) or infer_task_type(labels[:, j])) for j, n in enumerate(names)]
    for n, k in zip(names, kinds):
        if k not in TABLE_TASK_TYPES:
            raise ValueError(f"data.task_types: task {n!r} has type {k!r}; expected one of {list(TABLE_TASK_TYPES)}")

    if split_column is not None:
        splits = _column_split(file, frame, str(split_column))
        how = f"data.split_column {str(split_column)!r}"
    else:
        splits = seeded_split(strata, int(seed))
        how = f"the seeded 60/20/20 split{' stratified by task' if long else ''}"
    _check_counts(file, names, labels, splits, how)

    numeric, categorical = _feature_kinds(file, frame, feature_cols)
    inputs, input_names = encode_features(frame, numeric, categorical, splits, str(file))
    datasets = []
    for x, rows in zip(inputs, splits):
        ys = {n: _targets(file, n, k, labels[rows, j]) for j, (n, k) in enumerate(zip(names, kinds))}
        datasets.append(TensorTaskDataset(torch.from_numpy(x), ys))
    info = {"path": str(file), "form": "wide" if wide else "long", "features": list(feature_cols),
            "categorical": list(categorical), "inputs": len(input_names),
            "split": "column" if split_column is not None else "seeded", "seed": int(seed),
            "rows": [int(r.size) for r in splits]}
    try:
        tasks = [Task(n, k) for n, k in zip(names, kinds)]
        return TaskData("table", tasks, *datasets, input_shape=(inputs[0].shape[1],), groups=None, info=info)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from None
