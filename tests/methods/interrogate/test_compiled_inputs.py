"""Hostile files for ``load_compiled``: a malformed ``architecture.json`` or a truncated / foreign
``model.safetensors`` is one ``ValueError`` line naming the file; foreign classes stay refused and
nothing is allocated before the weight file's header matches the description."""

from __future__ import annotations

import json

import pytest
import torch
from interrogate_helpers import TASKS, make_gated, mixed_gates
from safetensors.torch import load_file, save_file

from taskgrouping.methods.interrogate import load_compiled, module_from_description, save_compiled
from taskgrouping.methods.interrogate.serialization import MAX_MODULE_DEPTH


@pytest.fixture()
def saved(tmp_path):
    net, *_ = make_gated("mlp", (8,), {"widths": (4,)}, TASKS)
    mixed_gates(net)
    compiled = net.compile().eval()
    save_compiled(compiled, tmp_path)
    return tmp_path, compiled


def _arch(d):
    return json.loads((d / "architecture.json").read_text())


def _write(d, arch):
    (d / "architecture.json").write_text(json.dumps(arch))


def _fails(d, match):
    with pytest.raises(ValueError, match=match) as info:
        load_compiled(d)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_good_directory_still_loads_with_identical_outputs(saved):
    d, compiled = saved
    again = load_compiled(d)
    x = torch.randn(3, 8)
    with torch.no_grad():
        a, b = compiled(x), again(x)
    assert all(torch.equal(a[t], b[t]) for t in a)
    assert all(p.device.type == "cpu" for p in again.parameters())


@pytest.mark.parametrize("text, match", [
    ("", r"architecture\.json: not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, r"architecture\.json: JSON nested more than 64 levels deep"),
    ('{"format": 1, "format": 2}', r"architecture\.json: key 'format' appears twice"),
    ("[]", r"architecture\.json: expected format 'taskgrouping.interrogate.compiled', got 'list'"),
    ('{"format": "taskgrouping.interrogate.compiled", "version": 7}', r"unsupported version 7; expected 1"),
    ('{"format": "taskgrouping.interrogate.compiled", "version": 1}', r"no 'architecture' key"),
    ('{"format": "taskgrouping.interrogate.compiled", "version": 1, "architecture": []}',
     r"architecture\.json: model: expected a module description with a 'class' key"),
])
def test_architecture_that_is_not_a_description_is_refused(saved, text, match):
    d, _ = saved
    (d / "architecture.json").write_text(text)
    _fails(d, match)


def test_binary_architecture_is_refused(saved):
    d, _ = saved
    (d / "architecture.json").write_bytes(bytes(range(256)))
    _fails(d, r"architecture\.json: holds NUL bytes")


@pytest.mark.parametrize("cls, match", [
    ("subprocess.Popen", r"'subprocess.Popen' is not a torch.nn, taskgrouping.models or"),
    ("os.system", r"'os.system' is not a torch.nn"),
    (123, r"expected a module description with a 'class' key"),
    ("taskgrouping.models.branched.copy", r"'taskgrouping.models.branched.copy' is not an nn.Module"),
    ("taskgrouping.models.branched.Tensor", r"is not an nn.Module"),
    ("taskgrouping.models.nope.Module", r"unknown class"),
    ("torch.nn.modules..Linear", r"unknown class"),
])
def test_foreign_or_unknown_classes_stay_refused(saved, cls, match):
    d, _ = saved
    arch = _arch(d)
    arch["architecture"]["children"]["stem"]["class"] = cls
    _write(d, arch)
    _fails(d, r"architecture\.json: model\.stem: .*" + match)


def test_a_foreign_class_reexported_by_an_allowed_module_is_refused(saved, monkeypatch):
    import collections

    import taskgrouping.models.heads as heads

    class Foreign(torch.nn.Module):
        pass

    Foreign.__module__ = "collections"
    monkeypatch.setattr(collections, "Foreign", Foreign, raising=False)
    monkeypatch.setattr(heads, "Foreign", Foreign, raising=False)
    d, _ = saved
    arch = _arch(d)
    arch["architecture"]["children"]["stem"]["class"] = "taskgrouping.models.heads.Foreign"
    _write(d, arch)
    _fails(d, r"is collections\..*Foreign, which is not a torch.nn")


def test_a_top_module_of_another_class_is_refused(saved):
    d, _ = saved
    arch = _arch(d)
    arch["architecture"] = arch["architecture"]["children"]["stem"]
    _write(d, arch)
    _fails(d, r"the top module is .*, expected CompiledInterroGate")


_BAD_SHAPE = r"model\.w: shape must be a list of integers >= 0"


@pytest.mark.parametrize("section, value, match", [
    ("attributes", {"forward": 1}, r"model: attribute 'forward' is not a plain attribute"),
    ("attributes", {"_parameters": {}}, r"model: attribute '_parameters' is not a plain attribute"),
    ("attributes", {"__class__": "x"}, r"model: attribute '__class__' is not a plain attribute"),
    ("attributes", {"not a name": 1}, r"model: attribute 'not a name' is not a plain attribute"),
    ("attributes", {"x": {"tuple": 5}}, r"model\.x: expected a plain value, a list or"),
    ("attributes", {"x": {"eval": "1"}}, r"model\.x: expected a plain value"),
    ("attributes", [1], r"model: 'attributes' must be an object, got list"),
    ("parameters", {"w": 3}, r"model\.w: expected null or"),
    ("parameters", {"w": {"shape": "abc", "dtype": "torch.float32"}}, _BAD_SHAPE),
    ("parameters", {"w": {"shape": [-1], "dtype": "torch.float32"}}, _BAD_SHAPE),
    ("parameters", {"w": {"shape": [True], "dtype": "torch.float32"}}, _BAD_SHAPE),
    ("parameters", {"w": {"shape": [2], "dtype": "torch.float128"}}, r"model\.w: unsupported dtype 'torch.float128'"),
    ("parameters", {"w": {"shape": [2], "dtype": ["x"]}}, r"model\.w: unsupported dtype \['x'\]"),
    ("parameters", {"a.b": {"shape": [2], "dtype": "torch.float32"}}, r"model: parameter name can't contain"),
    ("buffers", {"": {"shape": [2], "dtype": "torch.float32"}}, r"model: buffer name can't be empty"),
    ("children", {"x": 5}, r"model\.x: expected a module description with a 'class' key"),
    ("children", 5, r"model: 'children' must be an object, got int"),
])
def test_malformed_sections_name_the_module(saved, section, value, match):
    d, _ = saved
    arch = _arch(d)
    arch["architecture"][section] = value
    _write(d, arch)
    _fails(d, r"architecture\.json: " + match)


def test_a_description_claiming_huge_tensors_allocates_nothing(saved):
    d, _ = saved
    arch = _arch(d)
    arch["architecture"]["children"]["stem"]["parameters"]["huge"] = {"shape": [10**9, 10**9],
                                                                      "dtype": "torch.float32"}
    _write(d, arch)
    msg = _fails(d, r"model\.safetensors: tensors do not fit the architecture in .*architecture\.json: "
                    r"missing stem\.huge")
    assert "\n" not in msg


def test_module_nesting_is_bounded():
    spec = {"class": "torch.nn.modules.container.Sequential"}
    for _ in range(MAX_MODULE_DEPTH + 2):
        spec = {"class": "torch.nn.modules.container.Sequential", "children": {"0": spec}}
    with pytest.raises(ValueError, match=f"nested more than {MAX_MODULE_DEPTH} levels deep"):
        module_from_description(spec)


def test_truncated_weights_are_named(saved):
    d, _ = saved
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    _fails(d, r"model\.safetensors: not a readable safetensors file")


@pytest.mark.parametrize("payload", [b"", b"PK\x03\x04" + b"\0" * 60, b"\x10\x00\x00\x00\x00\x00\x00\x00{}"])
def test_foreign_bytes_as_weights_are_named(saved, payload):
    d, _ = saved
    (d / "model.safetensors").write_bytes(payload)
    _fails(d, r"model\.safetensors: not a readable safetensors file")


def test_weights_of_another_shape_or_dtype_are_named(saved):
    d, _ = saved
    w = d / "model.safetensors"
    tensors = load_file(str(w))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    save_file(dict(tensors, **{key: tensors[key].double()}), str(w))
    _fails(d, rf"mismatched {key} \(F64 .*expected F32")
    save_file(dict(tensors, extra=torch.zeros(1)), str(w))
    _fails(d, r"unexpected extra")
