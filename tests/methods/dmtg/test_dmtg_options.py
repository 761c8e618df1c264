"""DMTG's options: a recipe fills what is unset, and bad values fail clearly, naming ``dmtg.<key>``, at
config validation before anything trains."""

import dataclasses

import pytest

from dmtg_fixtures import method_ctx, small_data
from taskgrouping.config import ConfigError, build_config
from taskgrouping.methods.dmtg import RECIPES, DMTGOptions, dmtg


@pytest.mark.parametrize("K, options, msg", [
    (5, {}, "1 <= K <= number of tasks"), (0, {}, "1 <= K"), (2, {"tau": 0}, "dmtg.tau must be a finite number > 0"),
    (2, {"tau": -1.0}, "dmtg.tau"), (2, {"init": "prior", "prior": [[0.0, 1.0]] * 3}, "N x K = 4 x 2"),
    (2, {"recipe": "magic"}, "dmtg.recipe"), (2, {"bogus": 1}, "unknown config key dmtg.bogus"),
    (2, {"warmup": "noisy"}, r"dmtg.warmup must be one of probe \| softmax \| gumbel \| uniform, got 'noisy'"),
])
def test_bad_options(K, options, msg):
    with pytest.raises(ValueError, match=msg):
        dmtg(method_ctx(small_data(), K, options))


@pytest.mark.parametrize("key, value", [("mates_weight", -1.0), ("mates_every", 0), ("mates_every", 2.5),
                                        ("mates_decay", 1.0)])
def test_bad_mates_options_are_clear_errors(key, value):
    with pytest.raises(ValueError, match=f"dmtg.{key}"):
        DMTGOptions.from_section("dmtg", {key: value})


@pytest.mark.parametrize("options, key", [
    ({"init": "prior"}, "dmtg.prior"), ({"init": "affinity"}, "dmtg.warm_start"), ({"retrain": ["x"]}, "dmtg.retrain"),
    ({"warm_epochs": 0}, "dmtg.warm_epochs"), ({"samples": 0}, "dmtg.samples"), ({"tau_decay": 1.5}, "dmtg.tau_decay"),
    ({"prune_threshold": 1.0}, "dmtg.prune_threshold"), ({"head_pruning": "yes"}, "dmtg.head_pruning"),
])
def test_other_bad_options_name_their_key(options, key):
    with pytest.raises(ValueError, match=key):
        DMTGOptions.from_section("dmtg", options)


def test_tau_below_zero_fails_at_config_validation():
    """``--set dmtg.tau=-1`` fails while the config is built (nothing loaded or trained), naming ``dmtg.tau``."""
    with pytest.raises(ConfigError, match=r"^dmtg\.tau must be a finite number > 0, got -1$"):
        build_config(preset="planted", overrides=["methods=[naive_mtl,dmtg]", "dmtg.tau=-1"])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_fills_only_what_is_unset(recipe):
    opts = DMTGOptions(recipe=recipe, tau=0.3, samples=None)
    assert opts.tau == 0.3
    for key, value in RECIPES[recipe].items():
        if key != "tau":
            assert getattr(opts, key) == value, key
    assert DMTGOptions(prior_strength=None).prior_strength == 3.0  # off the recipe, null is the default
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.tau = 1.0  # type: ignore[misc]
