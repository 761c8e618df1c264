"""Every bad config value is one line naming the key before anything is written: types and ranges of
every section, the run's name, balancer and backbone options, method / balancer combinations, YAML
alias bombs and nesting; and what needs the data (the model built for its input shape, the balancer
on its tasks) right after it loads."""

import copy
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from taskgrouping import config as config_module
from taskgrouping.config import (DEFAULTS, MAX_YAML_ALIASES, ConfigError, build_config, check_config_against_data,
                                 load_preset, load_yaml, merge, preset_names)
from taskgrouping.engine.driver import prepare_data
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.option_values import check_factory_options, describe, matches

BOMB = """name: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
"""

BAD = {
    "float epochs": (["train.epochs=1.5"], "train.epochs must be an integer >= 1, got 1.5"),
    "float batch size": (["train.batch_size=1.5"], "train.batch_size must be an integer >= 1, got 1.5"),
    "infinite lr": (["train.lr=.inf"], "train.lr must be a finite number > 0, got inf"),
    "nan lr": (["train.lr=.nan"], "train.lr must be a finite number > 0, got nan"),
    "string lr": (["train.lr=fast"], "train.lr must be a finite number > 0, got 'fast'"),
    "bool lr": (["train.lr=true"], "train.lr must be a finite number > 0, got True"),
    "number for a flag": (["train.amp=3"], "train.amp must be true or false, got 3"),
    "momentum 1.5": (["train.momentum=1.5"], "train.momentum must be a finite number >= 0 and < 1"),
    "plateau factor 2": (["train.schedule=plateau", "train.gamma=2"],
                         "train.gamma must be a finite number > 0 and < 1"),
    "negative patience": (["train.plateau_patience=-1"], "train.plateau_patience must be an integer >= 0"),
    "unknown optimiser": (["train.optimizer=lbfgs"], "train.optimizer must be one of ['adam', 'adamw', 'sgd']"),
    "nested method list": (["methods=[[naive_mtl]]"], "methods[0] must be a method name, got ['naive_mtl']"),
    "number as method": (["methods=[naive_mtl, 3]"], "methods[1] must be a method name, got 3"),
    "bool K": (["K=true"], "K must be an integer >= 1, got True"),
    "float seed": (["seed=1.5"], "seed must be an integer"),
    "seed beyond int64": (["seed=18446744073709551617"], "seed must be an integer between"),
    "bool threads": (["threads=true"], "threads must be an integer between 0 and 4096"),
    "list reference": (["reference=[a]"], "reference must be a method name (or null), got ['a']"),
    "list data name": (["data.name=[x]"], "unknown dataset ['x']"),
    "nan data option": (["data.fractions=[0.5, .nan, 0.5]"], "data.fractions must be a list (each item a finite"),
    "float data size": (["data.name=planted", "data.n_tasks=1.5"], "data.n_tasks must be an integer, got 1.5"),
    "model options not a mapping": (["model.options=[1]"], "model.options must be a mapping"),
    "unknown backbone": (["model.backbone=resnet1000"], "model.backbone: unknown backbone 'resnet1000'"),
    "string width": (["model.options.widths=[a]"], "model.options.widths must be a list (each item an integer)"),
    "unknown backbone option": (["model.options.depth=3"], "unknown option(s) model.options.depth"),
    "negative shared blocks": (["model.shared_blocks=-1"], "model.shared_blocks must be an integer >= 0"),
    "unknown balancer": (["balancer.name=magic"], "balancer.name: unknown balancer 'magic'"),
    "list balancer": (["balancer.name=[ew]"], "unknown balancer ['ew']"),
    "unknown balancer option": (["balancer.options.foo=1"], "balancer 'ew': unknown option(s) balancer.options.foo"),
    "balancer options not a mapping": (["balancer.options=[1]"], "balancer.options must be a mapping"),
    "nan balancer option": (["balancer.name=cagrad", "balancer.options.c=.nan"],
                            "balancer 'cagrad': balancer.options.c must be a finite number, got nan"),
    "float iterations": (["balancer.name=mgda", "balancer.options.max_iters=1.5"],
                         "balancer.options.max_iters must be an integer, got 1.5"),
    "negative lr of famo": (["balancer.name=famo", "balancer.options.lr=-1"],
                            "balancer.options.lr must be a finite number > 0, got -1"),
    "negative lam (own check)": (["balancer.name=cosreg", "balancer.options.lam=-1"],
                                 "balancer 'cosreg': balancer.options.lam must be >= 0"),
    "bad literal": (["balancer.name=pcgrad", "balancer.options.head_grads=all"],
                    "balancer.options.head_grads must be one of ['unweighted', 'weighted']"),
    "feature-level balancer, featureless method": (["balancer.name=mgda_ub", "methods=[naive_mtl, interrogate]"],
                                                   "balancer 'mgda_ub' works on the shared features"),
    "feature_level option, featureless method": (["balancer.name=pcgrad", "balancer.options.feature_level=true",
                                                  "methods=[interrogate]"], "method 'interrogate' gives none"),
    "diagnostics, featureless method": (["diagnostics.every=2", "methods=[interrogate]"],
                                        "diagnostics.every=2: the diagnostics need the shared features"),
    "bool diagnostics": (["diagnostics.every=true"], "diagnostics.every must be an integer >= 0"),
    "absolute name": (["name=/tmp/elsewhere"], "name '/tmp/elsewhere' is not allowed"),
    "parent name": (["name=../up"], "name '../up' is not allowed"),
    "nested name": (["name=a/b"], "name 'a/b' is not allowed"),
    "backslash name": (["name=a\\b"], "is not allowed"),
    "long name": (["name=" + "x" * 101], "is not allowed; expected a plain run name"),
    "control character in name": (['name="a\\nb"'], "name 'a\\nb' is not allowed"),
    "list name": (["name=[1]"], "name must be a string, got [1]"),
    "alias bomb in --set": (["name=[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                             "[*b,*b,*b,*b,*b,*b,*b,*b,*b]]"],
                            f"--set name: uses more than {MAX_YAML_ALIASES} YAML aliases"),
    "deep --set value": (["name=" + "[" * 40 + "]" * 40], "--set name: YAML nested more than 32 levels deep"),
    "deep --set key": (["train." + ".".join(["a"] * 40) + "=1"], "a key of 41 parts"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_value_is_one_line_naming_the_key(case):
    overrides, msg = BAD[case]
    with pytest.raises(ConfigError) as info:
        build_config(preset="digits", overrides=overrides)
    text = str(info.value)
    assert msg in text, text
    assert "\n" not in text


def test_the_name_is_checked_first():
    with pytest.raises(ConfigError, match="name '../x' is not allowed"):
        build_config(preset="digits", overrides=["name=../x", "train.epochs=1.5", "balancer.name=magic"])


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_validates_unchanged_also_against_its_data(preset):
    cfg = build_config(preset=preset)
    assert cfg == merge(copy.deepcopy(DEFAULTS), load_preset(preset))
    check_config_against_data(cfg, prepare_data(cfg))


def test_good_values_pass_and_exponent_floats_are_numbers():
    cfg = build_config(preset="digits", overrides=["train.lr=1e-3", "balancer.name=cagrad", "balancer.options.c=0.5",
                                                   "name=my run.v2", "seed=-1", "model.options.widths=[8]"])
    assert cfg["train"]["lr"] == 0.001 and isinstance(cfg["train"]["lr"], float)
    assert load_yaml("x: 2.5e+3", "t")["x"] == 2500.0
    assert load_yaml(config_module.dump({"s": "1e5", "f": 1e-5}), "t") == {"s": "1e5", "f": 1e-5}


def test_alias_bomb_file_is_refused_before_expansion(tmp_path, monkeypatch):
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)

    def never(*args, **kwargs):
        raise AssertionError("the document was built")

    monkeypatch.setattr(config_module.yaml, "load", never)
    with pytest.raises(ConfigError, match=f"{f}: uses more than {MAX_YAML_ALIASES} YAML aliases"):
        build_config(f)


def test_a_few_aliases_are_fine(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reference: &r naive_mtl\nmethods: [*r, single_task]\ntrain: {epochs: 2}\n")
    cfg = build_config(f, preset="digits")
    assert cfg["methods"] == ["naive_mtl", "single_task"]


def test_deep_or_huge_config_file(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        build_config(deep)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2**20) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        build_config(big)
    with pytest.raises(ConfigError, match="is a directory"):
        build_config(tmp_path)


def test_train_config_checks_every_field_directly():
    with pytest.raises(ValueError, match="train.epochs must be an integer >= 1, got 1.5"):
        TrainConfig(epochs=1.5)
    with pytest.raises(ValueError, match="train.grad_clip must be a finite number >= 0"):
        replace(TrainConfig(), grad_clip=float("nan"))
    assert TrainConfig(lr=1, epochs=torch.tensor(3).item()).lr == 1


def test_option_values_by_annotation():
    from typing import Literal, Optional, Sequence

    assert matches([1, 2], Sequence[int]) and not matches([1, True], Sequence[int])
    assert matches(None, Optional[float]) and not matches(float("inf"), float)
    assert matches("a", Literal["a", "b"]) and not matches(1, Literal[True])
    assert describe(Optional[Sequence[int]]) == "a list (each item an integer) or null"

    def factory(width: int = 4, names: Sequence[str] = ()) -> None:
        return None

    with pytest.raises(ValueError, match=r"thing: x\.width must be an integer, got 'wide'"):
        check_factory_options(factory, {"width": "wide"}, "thing", prefix="x.")
    with pytest.raises(ValueError, match=r"unknown option\(s\) x\.depth"):
        check_factory_options(factory, {"depth": 2}, "thing", prefix="x.")


# -- what needs the data ----------------------------------------------------------------------------

DATA_BAD = {
    "negative width": (["model.options.widths=[-5]"],
                       "model.options: backbone 'mlp': option widths must be a list of positive integers, got [-5]"),
    "model beyond memory": (["model.options.widths=[100000000000]"], "more than the"),
    "too many shared blocks": (["model.shared_blocks=5"], "model.shared_blocks=5 but backbone 'mlp' has 2 blocks"),
    "image backbone on vectors": (["model.backbone=resnet18", "model.options={}"],
                                  "model.backbone: backbone 'resnet18' expects image inputs"),
    "unknown primary task": (["balancer.name=auto_lambda", "balancer.options.primary=[zz]"],
                             "primary tasks ['zz'] are not among the losses"),
    "more hvp tasks than tasks": (["balancer.name=cosreg", "balancer.options.hvp_tasks=9"],
                                  "hvp_tasks=9 exceeds the 4 tasks"),
}


@pytest.fixture(scope="module")
def digits_data():
    return prepare_data(build_config(preset="digits"))


@pytest.mark.parametrize("case", sorted(DATA_BAD))
def test_bad_value_found_with_the_data(case, digits_data):
    overrides, msg = DATA_BAD[case]
    cfg = build_config(preset="digits", overrides=overrides)
    with pytest.raises(ConfigError) as info:
        check_config_against_data(cfg, digits_data)
    assert msg in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_checks_with_the_data_leave_the_random_stream_alone(digits_data):
    cfg = build_config(preset="digits", overrides=["balancer.name=rlw"])
    torch.manual_seed(5)
    before = torch.get_rng_state()
    check_config_against_data(cfg, digits_data)
    assert torch.equal(before, torch.get_rng_state())


# -- end to end: exit 2, one line, nothing written ------------------------------------------------------

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "taskgrouping.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_refuses_bad_values_before_writing(tmp_path):
    out = tmp_path / "run"
    proc = _cli("run", "--preset", "digits", "--out", str(out), "--set", "train.epochs=1.5", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "error: train.epochs must be an integer >= 1, got 1.5\n"
    assert not out.exists()
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    proc = _cli("run", str(bomb), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "YAML aliases" in proc.stderr
    proc = _cli("run", "--preset", "digits", "--set", f"name={tmp_path / 'outside'}", cwd=tmp_path)
    assert proc.returncode == 2 and "is not allowed" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]
