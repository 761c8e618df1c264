"""Options of the method tag: defaults and value checks naming the key."""

from __future__ import annotations

import pytest

from taskgrouping.methods.options import OptionError
from taskgrouping.methods.tag import TAGOptions


def test_defaults():
    assert TAGOptions.defaults() == {"every": 1, "lookahead": "sgd", "divide_by_lr": True, "solver": "auto",
                                     "init": "scratch"}


@pytest.mark.parametrize("section, message", [
    ({"every": 0}, "tag.every must be an integer >= 1"),
    ({"every": True}, "tag.every"),
    ({"lookahead": "adam"}, "tag.lookahead must be one of ['optimizer', 'sgd']"),
    ({"divide_by_lr": 1}, "tag.divide_by_lr must be true or false"),
    ({"solver": "local"}, "tag.solver must be one of ['auto', 'exhaustive', 'milp']"),
    ({"init": "warm"}, "tag.init must be one of ['scratch', 'naive_mtl']"),
    ({"budget": 2}, "unknown config key tag.budget"),
])
def test_bad_values_name_the_key(section, message):
    with pytest.raises(OptionError) as info:
        TAGOptions.from_section("tag", section)
    assert message in str(info.value)
