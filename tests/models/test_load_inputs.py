"""Hostile model files for ``load_branched``: every malformed description or weight file is one
``ValueError`` / ``FileNotFoundError`` line naming the file, found before any weight is allocated."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import taskgrouping.readers as readers
from taskgrouping.models.branched import build_branched_model, load_branched, save_branched
from taskgrouping.tasks import Task

TASKS = [Task("a", "binary"), Task("b", "regression")]


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_branched_model(TASKS, [["a", "b"]], (8,), backbone="mlp", backbone_options={"widths": [4]})
    save_branched(model, tmp_path / "m")
    return tmp_path / "m"


def _spec(base):
    return json.loads(base.with_suffix(".json").read_text())


def _write_spec(base, spec):
    base.with_suffix(".json").write_text(json.dumps(spec))


def _fails(base, match, exc=ValueError):
    with pytest.raises(exc, match=match) as info:
        load_branched(base)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_good_pair_still_loads_with_identical_outputs(saved):
    torch.manual_seed(0)
    model = build_branched_model(TASKS, [["a", "b"]], (8,), backbone="mlp", backbone_options={"widths": [4]}).eval()
    again = load_branched(saved)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert all(torch.equal(model(x)[t], again(x)[t]) for t in ("a", "b"))


@pytest.mark.parametrize("text, match", [
    ("{", r"m\.json: not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, r"m\.json: JSON nested more than 64 levels deep"),
    ('{"tasks": [], "tasks": []}', r"m\.json: key 'tasks' appears twice"),
    ("[1, 2]", r"m\.json: expected the JSON object written by save_branched, got list"),
])
def test_spec_that_is_not_a_description_is_refused(saved, text, match):
    saved.with_suffix(".json").write_text(text)
    _fails(saved, match)


def test_binary_spec_is_refused(saved):
    saved.with_suffix(".json").write_bytes(b"\xff\xfe\x00\x01" * 10)
    _fails(saved, r"m\.json: holds NUL bytes")


def test_oversized_spec_is_refused_without_reading_it_all(saved, monkeypatch):
    monkeypatch.setattr(readers, "MAX_TEXT_BYTES", 64)
    _fails(saved, r"m\.json: larger than 64 bytes")


@pytest.mark.parametrize("key, value, match", [
    ("backbone", None, r"'backbone' must be a registered backbone name, got null"),
    ("input_shape", "8", r"'input_shape' must be a list of positive integers, got \"8\""),
    ("input_shape", [8.5], r"'input_shape' must be a list of positive integers"),
    ("input_shape", [-8], r"'input_shape' must be a list of positive integers"),
    ("groups", [[1]], r"'groups' must be a list of lists of task names"),
    ("groups", "ab", r"'groups' must be a list of lists of task names"),
    ("serves", {"a": True, "b": 0}, r"'serves' must be an object \{task: branch index\}"),
    ("tasks", ["a"], r"'tasks' must be a list of task objects"),
    ("shared_blocks", -1, r"'shared_blocks' must be an integer >= 0"),
    ("backbone_options", [], r"'backbone_options' must be an object of options"),
])
def test_wrong_types_name_the_key(saved, key, value, match):
    spec = _spec(saved)
    spec[key] = value
    _write_spec(saved, spec)
    _fails(saved, r"m\.json: " + match)


def test_missing_key_is_named(saved):
    spec = _spec(saved)
    del spec["serves"]
    _write_spec(saved, spec)
    _fails(saved, r"m\.json: missing key 'serves'")


@pytest.mark.parametrize("change, match", [
    (lambda s: s.update(backbone="os.system"), r"unknown backbone 'os.system'"),
    (lambda s: s["tasks"][0].update(kind="poison"), r"unknown kind 'poison'"),
    (lambda s: s["tasks"][0].update(loader="x"), r"unexpected keyword argument 'loader'"),
    (lambda s: s["tasks"][0].update(num_classes="2"), r"not a valid model description"),
    (lambda s: s.update(groups=[["a", "zz"]]), r"unknown task 'zz'"),
    (lambda s: s.update(serves={"a": 7, "b": 0}), r"served by branch 7"),
    (lambda s: s.update(shared_blocks=9), r"shared_blocks=9 but the backbone has 1 blocks"),
    (lambda s: s.update(backbone_options={"widths": 5}), r"not a valid model description"),
    (lambda s: s.update(backbone_options={"depth": 5}), r"not a valid model description"),
    (lambda s: s.update(input_shape=[3, 2, 2], backbone="small_cnn"), r"not a valid model description"),
])
def test_bad_values_are_one_error_naming_the_file(saved, change, match):
    spec = _spec(saved)
    change(spec)
    _write_spec(saved, spec)
    _fails(saved, r"m\.json: .*" + match)


def test_a_description_claiming_a_huge_network_allocates_nothing(saved):
    spec = _spec(saved)
    spec["backbone_options"] = {"widths": [10**12]}  # 4 TB of weights if it were allocated
    _write_spec(saved, spec)
    msg = _fails(saved, r"m\.safetensors: tensors do not fit the architecture in .*m\.json")
    assert "expected F32 [1000000000000, 8]" in msg


def test_truncated_weights_are_named(saved):
    w = saved.with_suffix(".safetensors")
    w.write_bytes(w.read_bytes()[:-10])
    _fails(saved, r"m\.safetensors: not a readable safetensors file")


@pytest.mark.parametrize("payload", [b"", b"\x01" * 7, b"not a safetensors file at all", b"\xff" * 8 + b"{}"])
def test_foreign_bytes_as_weights_are_named(saved, payload):
    saved.with_suffix(".safetensors").write_bytes(payload)
    _fails(saved, r"m\.safetensors: not a readable safetensors file")


def test_weights_of_another_model_are_named(saved):
    save_file({"w": torch.zeros(3)}, str(saved.with_suffix(".safetensors")))
    msg = _fails(saved, r"m\.safetensors: tensors do not fit .*missing .*; unexpected w")
    assert "and" in msg  # long lists are shortened


def test_weights_of_another_dtype_are_refused_not_cast(saved):
    w = saved.with_suffix(".safetensors")
    from safetensors.torch import load_file

    save_file({k: v.double() if v.is_floating_point() else v for k, v in load_file(str(w)).items()}, str(w))
    _fails(saved, r"mismatched .*\(F64 \[.*\], expected F32")


def test_missing_files_are_named(saved):
    saved.with_suffix(".safetensors").unlink()
    _fails(saved, r"m\.safetensors not found", FileNotFoundError)


def test_torch_errors_while_building_stay_one_line(saved):
    spec = _spec(saved)
    spec["input_shape"] = [2] * 200  # 2**200 inputs: torch refuses the size with a multi-line message
    _write_spec(saved, spec)
    _fails(saved, r"m\.json: not a valid model description \(.*Overflow")
