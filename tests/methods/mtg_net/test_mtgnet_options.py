"""The ``mtg_net`` method's options: bad values fail when the config is validated, before anything
trains, with a message naming the key; the round count follows ``rounds``."""

from __future__ import annotations

import pytest

from taskgrouping.config import ConfigError, build_config
from taskgrouping.methods.mtg_net import MTGNetOptions


@pytest.mark.parametrize("override, message", [
    ("mtg_net.rounds=-1", "mtg_net.rounds must be 'n_tasks', 'paper' or an integer >= 0, got -1"),
    ("mtg_net.meta_epochs=0", "mtg_net.meta_epochs must be a positive integer, got 0"),
    ("mtg_net.overlap=1", "mtg_net.overlap must be true or false, got 1"),
    ("mtg_net.reuse=yes_please", "mtg_net.reuse must be true or false"),
    ("mtg_net.gain_source=both", "mtg_net.gain_source must be 'hybrid' or 'predicted', got 'both'"),
    ("mtg_net.acquisition=greedy", "mtg_net.acquisition must be auto, active, search or random, got 'greedy'"),
    ("mtg_net.initial=all", "mtg_net.initial must be auto, paper or leave_one_out, got 'all'"),
    ("mtg_net.backend=threads", "mtg_net.backend: unknown backend 'threads'"),
    ("mtg_net.workers=0", "mtg_net.workers must be a positive integer"),
    ("mtg_net.bogus=1", "unknown config key mtg_net.bogus"),
])
def test_bad_options_fail_at_validation_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["methods=[mtg_net]", override])
    assert message in str(err.value)


def test_defaults_and_round_counts():
    opts = MTGNetOptions()
    assert (opts.backend, opts.workers, opts.rounds, opts.overlap, opts.reuse, opts.meta_epochs, opts.gain_source,
            opts.acquisition, opts.initial) == ("sequential", None, "n_tasks", False, True, 20, "hybrid", "auto", "auto")
    assert opts.rounds_for(4) == 4
    assert MTGNetOptions(rounds="paper").rounds_for(5) == 10
    assert MTGNetOptions(rounds=0).rounds_for(5) == 0 and MTGNetOptions(rounds=7).rounds_for(3) == 7
    config = build_config(overrides=["methods=[mtg_net]", "mtg_net.rounds=paper", "mtg_net.backend=processes",
                                     "mtg_net.workers=2"])
    assert config["mtg_net"] == {"rounds": "paper", "backend": "processes", "workers": 2}
