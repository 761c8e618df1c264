"""Data sanity before anything trains: finite inputs named as such, every task labelled in every split,
usable labels, sizes; ``.npz`` headers checked before anything is allocated; generators bounded by
the memory there is."""

import io
import zipfile

import numpy as np
from conftest import npz_arrays
import pytest
import torch
from torch.utils.data import Dataset

from taskgrouping.data import checks
from taskgrouping.data.base import TaskData, TensorTaskDataset
from taskgrouping.data.checks import validate_data
from taskgrouping.data.registry import load_dataset
from taskgrouping.tasks import Task


def _data(x_val=None, y_val=None, y_test=None, tasks=None, n=12):
    g = torch.Generator().manual_seed(0)
    tasks = tasks or [Task("cls", "binary"), Task("reg", "regression")]

    def split(x=None, ys=None):
        x = torch.randn(n, 3, generator=g) if x is None else x
        ys = ys or {"cls": torch.randint(0, 2, (n,), generator=g), "reg": torch.randn(n, 1, generator=g)}
        return TensorTaskDataset(x, ys)

    return TaskData("toy", tasks, split(), split(x_val, y_val), split(None, y_test), input_shape=(3,))


def test_good_data_and_builtin_sets_pass():
    validate_data(_data())
    validate_data(load_dataset("digits"))
    validate_data(load_dataset("planted", n_train=50, n_val=20, n_test=20))


def test_nan_or_inf_in_inputs_is_named_as_such():
    x = torch.randn(12, 3)
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match="dataset 'toy': the val inputs \\(x\\) hold NaN at sample 7; expected finite"):
        validate_data(_data(x_val=x))
    x[7, 1] = float("inf")
    with pytest.raises(ValueError, match="hold an infinite value at sample 7"):
        validate_data(_data(x_val=x))


def test_scan_is_chunked_and_finds_late_samples(monkeypatch):
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 6)  # two samples per chunk
    x = torch.randn(12, 3)
    x[11, 0] = float("-inf")
    with pytest.raises(ValueError, match="at sample 11"):
        validate_data(_data(x_val=x))


def test_task_without_labels_in_a_split():
    no_val = {"cls": torch.full((12,), -1), "reg": torch.randn(12, 1)}
    with pytest.raises(ValueError, match="task 'cls' has no label in the val split"):
        validate_data(_data(y_val=no_val))
    no_test = {"cls": torch.randint(0, 2, (12,)), "reg": torch.full((12, 1), float("nan"))}
    with pytest.raises(ValueError, match="task 'reg' has no label in the test split"):
        validate_data(_data(y_test=no_test))
    missing = {"cls": torch.randint(0, 2, (12,))}
    with pytest.raises(ValueError, match="task 'reg' has no targets in the val split"):
        validate_data(_data(y_val=missing))


def test_labels_a_task_cannot_use():
    with pytest.raises(ValueError, match="task 'cls' has label 5 in the val split; expected class ids 0..1"):
        validate_data(_data(y_val={"cls": torch.full((12,), 5), "reg": torch.randn(12, 1)}))
    with pytest.raises(ValueError, match="task 'cls' has a non-integer label"):
        validate_data(_data(y_val={"cls": torch.full((12,), 0.5), "reg": torch.randn(12, 1)}))
    with pytest.raises(ValueError, match="task 'reg' has an infinite target in the val split"):
        validate_data(_data(y_val={"cls": torch.zeros(12, dtype=torch.long), "reg": torch.full((12, 1), float("inf"))}))


def test_sizes_and_shapes():
    data = _data()
    with pytest.raises(ValueError, match=r"the val inputs have shape \(4,\); expected the data's input shape \(3,\)"):
        validate_data(_data(x_val=torch.randn(12, 4)))
    data.test = TensorTaskDataset(torch.zeros(0, 3), {"cls": torch.zeros(0), "reg": torch.zeros(0, 1)})
    with pytest.raises(ValueError, match="the test split is empty"):
        validate_data(data)


class _Lazy(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        raise AssertionError("a lazy dataset was read")


def test_lazy_datasets_get_the_size_check_only():
    data = _data()
    data.train = _Lazy()
    validate_data(data)


# -- npz --------------------------------------------------------------------------------------------

def _arrays(**overrides):
    return npz_arrays(sizes=(20, 8, 8), dim=4, **overrides)


def _npz(path, **overrides):
    np.savez(path, **_arrays(**overrides))
    return str(path)


def test_npz_header_claiming_terabytes_is_refused_before_allocating(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (2**22, 2**20)})
    f = tmp_path / "huge.npz"
    with zipfile.ZipFile(f, "w") as z:
        for k, v in _arrays().items():
            if k == "x_train":
                z.writestr("x_train.npy", header.getvalue() + b"\0" * 64)
            else:
                buf = io.BytesIO()
                np.save(buf, v)
                z.writestr(f"{k}.npy", buf.getvalue())
    with pytest.raises(ValueError, match=f"{f}: array 'x_train' declares shape \\(4194304, 1048576\\) of float64 "
                                         "\\(32.0 TiB\\) but the file holds 64 bytes"):
        load_dataset("npz", path=str(f))


def test_npz_beyond_the_memory_available(tmp_path, monkeypatch):
    f = _npz(tmp_path / "d.npz")
    monkeypatch.setattr(checks, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match="d.npz: loading its arrays \\(the largest, 'x_train'.*more than the "
                                         "1000 bytes available"):
        load_dataset("npz", path=f)


def test_npz_string_object_and_complex_arrays_name_the_file(tmp_path):
    f = _npz(tmp_path / "s.npz", y_train=np.array([["yes", "no"]] * 20))
    with pytest.raises(ValueError, match="s.npz: y_train has dtype <U3 \\(strings\\); expected numeric labels"):
        load_dataset("npz", path=f)
    f = _npz(tmp_path / "o.npz", y_val=np.array([[1, None]] * 8, dtype=object))
    with pytest.raises(ValueError, match="o.npz: array 'y_val' holds pickled Python objects"):
        load_dataset("npz", path=f)
    f = _npz(tmp_path / "c.npz", x_test=np.ones((8, 4)) + 1j)
    with pytest.raises(ValueError, match="c.npz: x_test has dtype complex128"):
        load_dataset("npz", path=f)
    f = _npz(tmp_path / "n.npz", task_names=np.array(["a", ""]))
    with pytest.raises(ValueError, match="n.npz: task name must be a non-empty string"):
        load_dataset("npz", path=f)


def test_npz_content_checks_name_the_file(tmp_path):
    x = _arrays()["x_val"].copy()
    x[3, 2] = np.nan
    f = _npz(tmp_path / "x.npz", x_val=x)
    with pytest.raises(ValueError, match="x.npz: the val inputs \\(x\\) hold NaN at sample 3"):
        validate_data(load_dataset("npz", path=f))
    y = _arrays()["y_val"].copy()
    y[:, 1] = np.nan
    f = _npz(tmp_path / "v.npz", y_val=y)
    with pytest.raises(ValueError, match="v.npz: task 'b' has no label in the val split"):
        validate_data(load_dataset("npz", path=f))
    validate_data(load_dataset("npz", path=_npz(tmp_path / "good.npz")))


def test_generators_are_bounded_by_memory():
    with pytest.raises(ValueError, match="data: planted with 10000000000200 samples of data.input_dim=64 needs about"):
        load_dataset("planted", n_train=10**13, n_val=100, n_test=100)
    with pytest.raises(ValueError, match="data.image_size=100000 .* needs about"):
        load_dataset("multimnist", image_size=100000)
