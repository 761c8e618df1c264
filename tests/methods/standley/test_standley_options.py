"""Options of optimal / hoa / esa: defaults, value checks naming the key, the data-dependent limits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from taskgrouping.methods.options import OptionError
from taskgrouping.methods.standley import ESAOptions, HOAOptions, OptimalOptions


def _data(n: int) -> SimpleNamespace:
    """What check_data reads of a dataset: its task names."""
    return SimpleNamespace(task_names=[f"t{i}" for i in range(n)])


def test_defaults_are_the_documented_ones():
    assert OptimalOptions.defaults() == {"backend": "sequential", "workers": None, "ray_address": None,
                                         "cpus_per_job": 1.0, "gpus_per_job": 0.0, "budget": None,
                                         "half_size": True, "solver": "auto", "max_tasks": 10}
    assert HOAOptions().max_group_size is None and ESAOptions().early_fraction == 0.2
    assert OptimalOptions.from_section("optimal", {"max_tasks": None}).max_tasks == 10  # null = the default


@pytest.mark.parametrize("cls, method, section, message", [
    (HOAOptions, "hoa", {"budget": 0}, "hoa.budget must be a finite number > 0"),
    (HOAOptions, "hoa", {"budget": True}, "hoa.budget"),
    (OptimalOptions, "optimal", {"half_size": "yes"}, "optimal.half_size must be true or false"),
    (ESAOptions, "esa", {"solver": "greedy"}, "esa.solver must be one of ['auto', 'search', 'milp']"),
    (ESAOptions, "esa", {"early_fraction": 1.5}, "esa.early_fraction must be a finite number > 0 and <= 1"),
    (OptimalOptions, "optimal", {"max_tasks": 0}, "optimal.max_tasks must be an integer >= 1"),
    (HOAOptions, "hoa", {"max_group_size": 2.5}, "hoa.max_group_size must be an integer"),
    (HOAOptions, "hoa", {"backend": "threads"}, "hoa.backend: unknown backend 'threads'"),
    (HOAOptions, "hoa", {"cpus_per_job": 0}, "hoa.cpus_per_job must be a finite number > 0"),
    (HOAOptions, "hoa", {"gpus_per_job": -1}, "hoa.gpus_per_job must be a finite number >= 0"),
    (HOAOptions, "hoa", {"ray_address": ""}, "hoa.ray_address must be null or a Ray address"),
    (OptimalOptions, "optimal", {"workers": 0}, "optimal.workers must be a positive integer"),
    (ESAOptions, "esa", {"max_group_size": 3}, "unknown config key esa.max_group_size"),
])
def test_bad_values_name_the_key(cls, method, section, message):
    with pytest.raises(OptionError) as info:
        cls.from_section(method, section)
    assert message in str(info.value)


def test_task_count_limits():
    OptimalOptions(max_tasks=4).check_data(_data(4))
    with pytest.raises(ValueError, match=r"6 tasks exceed esa.max_tasks=5"):
        ESAOptions(max_tasks=5).check_data(_data(6))
    HOAOptions(max_group_size=3).check_data(_data(40))  # 9,880 triples
    with pytest.raises(ValueError, match="set hoa.max_group_size"):
        HOAOptions().check_data(_data(20))  # 2^20 - 211 estimated networks
