"""CelebA loader on tiny copies of the official files (JPEGs, list_attr_celeba.txt, list_eval_partition.txt)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures_realdata import attribute_line, celeba_image, write_celeba
from taskgrouping.data import celeba as celeba_mod
from taskgrouping.data.base import make_loader
from taskgrouping.data.celeba import CELEBA9, CELEBA40, celeba, preprocess_images
from taskgrouping.data.registry import load_dataset

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _cache_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.npy")) if d.is_dir() else []


def test_labels_and_splits_follow_hand_written_files(tmp_path):
    root = tmp_path / "data"
    write_celeba(root, codes=(0, 0, 0, 1, 1, 2))
    header = " ".join(CELEBA40)
    rows = {  # file -> attributes that are 1 (all others -1)
        "000001.jpg": {"Black_Hair", "Wearing_Hat"},
        "000002.jpg": {"Blond_Hair"},
        "000003.jpg": set(),
        "000004.jpg": {"Black_Hair", "No_Beard", "Young"},
        "000005.jpg": {"Wearing_Hat"},
        "000006.jpg": {"5_o_Clock_Shadow", "Black_Hair"},
    }
    lines = ["6", header]
    for f, pos in rows.items():
        vals = [1 if a in pos else -1 for a in CELEBA40]
        lines.append(attribute_line(f, vals).replace(" ", "   ", 1))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 0\n000003.jpg 0\n000004.jpg 1\n000005.jpg 1\n000006.jpg 2\n")

    data = celeba(root=str(root), attributes=["Black_Hair", "Wearing_Hat", "Young"], image_size=16)
    assert [t.name for t in data.tasks] == ["Black_Hair", "Wearing_Hat", "Young"]
    assert all(t.kind == "binary" and t.n_outputs == 2 for t in data.tasks)
    assert (len(data.train), len(data.val), len(data.test)) == (3, 2, 1)
    assert data.train.targets["Black_Hair"].tolist() == [1, 0, 0]
    assert data.train.targets["Wearing_Hat"].tolist() == [1, 0, 0]
    assert data.val.targets["Young"].tolist() == [1, 0]
    assert data.val.targets["Wearing_Hat"].tolist() == [0, 1]
    assert data.test.targets["Black_Hair"].tolist() == [1]
    assert data.train.targets["Young"].dtype == torch.int64
    assert data.input_shape == (3, 16, 16)


def test_celeba9_default_and_celeba40(tmp_path):
    root = tmp_path / "data"
    files, values = write_celeba(root, seed=3)
    nine = celeba(root=str(root))
    assert nine.task_names == list(CELEBA9)
    assert len(CELEBA40) == 40
    forty = celeba(root=str(root), attributes="celeba40", image_size=8)
    assert forty.task_names == list(CELEBA40)
    for j, a in enumerate(CELEBA40):
        expected = (values[:5, j] > 0).astype(np.int64)
        assert forty.train.targets[a].numpy().tolist() == expected.tolist()


def test_preprocessing_is_bilinear_without_antialiasing(tmp_path):
    root = tmp_path / "data"
    files, _ = write_celeba(root, codes=(0, 0, 1, 2))
    data = celeba(root=str(root), image_size=64)
    x, y = data.train[1]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
    decoded = np.array(Image.open(root / "img_align_celeba" / files[1]).convert("RGB"))
    assert decoded.shape == (218, 178, 3)
    ref = F.interpolate(torch.from_numpy(decoded).permute(2, 0, 1)[None].float() / 255, size=(64, 64),
                        mode="bilinear", align_corners=False, antialias=False)[0]
    assert (x - ref).abs().max() <= 0.5 / 255 + 1e-6  # uint8 cache rounds to the nearest 1/255
    pil = torch.from_numpy(np.array(Image.open(root / "img_align_celeba" / files[1]).convert("RGB")
                                      .resize((64, 64), Image.BILINEAR))).permute(2, 0, 1).float() / 255
    assert (x - pil).abs().max() > 20 / 255  # Pillow antialiases: clearly different pixels


def test_preprocess_hand_computed_halving():
    # Exact halving with half-pixel centres samples between pixels 2i and 2i+1: a 2x2 block mean.
    block = np.array([[10, 20, 200, 100], [30, 41, 0, 51], [7, 7, 255, 255], [9, 9, 255, 250]], dtype=np.uint8)
    img = np.repeat(block[:, :, None], 3, axis=2)
    out = preprocess_images([img], 2)[0, 0]
    assert out.tolist() == [[25, 88], [8, 254]]  # means 25.25, 87.75, 8.0, 253.75
    anti = F.interpolate(torch.from_numpy(block)[None, None].float(), size=(2, 2), mode="bilinear",
                         align_corners=False, antialias=True)[0, 0]
    assert anti.round().tolist() != out.float().tolist()


def test_cache_is_reused_then_invalidated_when_a_source_changes(tmp_path, monkeypatch):
    root = tmp_path / "data"
    files, _ = write_celeba(root)
    cache = root / ".taskgrouping_cache"
    first = celeba(root=str(root), image_size=32)
    cached = _cache_files(cache)
    assert len(cached) == 1 and first.info["cache_file"] == str(cached[0])
    mtime = cached[0].stat().st_mtime_ns

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although a valid cache exists")

    monkeypatch.setattr(celeba_mod, "read_rgb", no_decoding)
    again = celeba(root=str(root), image_size=32)
    assert torch.equal(again.train.x, first.train.x)
    assert _cache_files(cache) == cached and cached[0].stat().st_mtime_ns == mtime
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    img = root / "img_align_celeba" / files[0]
    celeba_image(999).save(img, quality=95)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = celeba(root=str(root), image_size=32)
    assert changed.info["cache_file"] != first.info["cache_file"]
    assert not torch.equal(changed.train.x[0], first.train.x[0])
    assert torch.equal(changed.train.x[1:], first.train.x[1:])
    img2 = root / "img_align_celeba" / files[2]
    st = img2.stat()
    os.utime(img2, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size and bytes, newer mtime
    touched = celeba(root=str(root), image_size=32)
    assert touched.info["cache_file"] != changed.info["cache_file"]
    assert torch.equal(touched.train.x, changed.train.x)
    other_size = celeba(root=str(root), image_size=16)
    assert len({d.info["cache_file"] for d in (first, changed, touched, other_size)}) == 4
    assert not list(cache.glob("*.tmp.npy"))


def test_unwritable_root_falls_back_to_user_cache(tmp_path):
    root = tmp_path / "data"
    write_celeba(root)
    (root / ".taskgrouping_cache").write_text("a file where the cache folder would go")
    os.chmod(root, stat.S_IRUSR | stat.S_IXUSR)
    try:
        data = celeba(root=str(root), image_size=8)
    finally:
        os.chmod(root, stat.S_IRWXU)
    user = tmp_path / "xdg" / "taskgrouping" / "celeba"
    assert data.info["cache_file"].startswith(str(user))
    assert len(_cache_files(user)) == 1


def test_accepts_celeba_subfolder_max_per_split_and_registry(tmp_path):
    write_celeba(tmp_path / "data" / "celeba", codes=(0, 0, 0, 0, 1, 1, 1, 2, 2, 2))
    data = load_dataset("celeba", root=str(tmp_path / "data"), max_per_split=2, image_size=16)
    assert (len(data.train), len(data.val), len(data.test)) == (2, 2, 2)
    x, y = next(iter(make_loader(data.train, batch_size=2, shuffle=False)))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert set(y) == set(CELEBA9) and y["Goatee"].dtype == torch.int64
    loss = data.tasks[0].loss(torch.zeros(2, 2), y[data.tasks[0].name])
    assert torch.isclose(loss, torch.tensor(np.log(2.0), dtype=loss.dtype))


def test_unknown_attribute_is_named_with_valid_ones(tmp_path):
    write_celeba(tmp_path)
    with pytest.raises(ValueError, match=r"Wearing_Hatt.*5_o_Clock_Shadow"):
        celeba(root=str(tmp_path), attributes=["Black_Hair", "Wearing_Hatt"])


def test_wrong_column_count_names_file_and_line(tmp_path):
    write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[5] = lines[5] + " 1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"list_attr_celeba\.txt.*line 6: 42 columns; expected 41"):
        celeba(root=str(tmp_path))


def test_bad_attribute_value_names_line_and_attribute(tmp_path):
    write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    parts = lines[3].split()
    parts[3] = "0"
    lines[3] = " ".join(parts)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 4: attribute 'Attractive' has value '0'"):
        celeba(root=str(tmp_path))


def test_corrupt_jpeg_is_named_and_leaves_no_cache(tmp_path):
    files, _ = write_celeba(tmp_path)
    bad = tmp_path / "img_align_celeba" / files[4]
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(ValueError, match=files[4]):
        celeba(root=str(tmp_path))
    assert not list((tmp_path / ".taskgrouping_cache").glob("*"))


def test_missing_files_are_named(tmp_path):
    files, _ = write_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / files[2]).unlink()
    with pytest.raises(FileNotFoundError, match=files[2]):
        celeba(root=str(tmp_path))
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        celeba(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        celeba(root=str(tmp_path / "nowhere"))


def test_partition_and_attribute_files_must_agree(tmp_path):
    write_celeba(tmp_path)
    part = tmp_path / "list_eval_partition.txt"
    part.write_text(part.read_text() + "999999.jpg 2\n")
    with pytest.raises(ValueError, match=r"999999\.jpg"):
        celeba(root=str(tmp_path))
    part.write_text(part.read_text().replace("999999.jpg 2", "000001.jpg 3"))
    with pytest.raises(ValueError, match=r"list_eval_partition\.txt.*line 10"):
        celeba(root=str(tmp_path))
