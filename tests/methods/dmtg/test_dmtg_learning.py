"""Whether S's learning moves a misplaced task (MultiMNIST preset, seed 0; benchmarks/results/dmtg_learning*.md
has all presets and seeds). The start is given as ``dmtg.prior`` (the known grouping with ``left_even``
among the right digit's tasks, logits 3 / 0), so whatever moves the task is S's learning.

The default recipe keeps the misplaced task (its own-loss gradient favours the branch that has adapted
to it); with the opt-in pull towards branch-mates whose gradients agree (``mates_weight``) it returns, and
so it does with the ``attribution`` recipe's pull towards the tasks that read the same inputs.
"""

import pytest

from conftest import run_preset

MATES = {"mates_weight": 10, "s_lr": 0.01, "mates_every": 5}


def _wrong_start() -> list[list[float]]:
    left = ["left_even", "left_gt4", "left_loop", "left_prime"]
    right = ["right_even", "right_gt4", "right_loop", "right_prime"]
    prior = [[3.0, 0.0] if t in left else [0.0, 3.0] for t in left + right]
    prior[0] = [0.0, 3.0]  # left_even starts among the right digit's tasks
    return prior


@pytest.mark.parametrize("extra, returns", [({}, False), (MATES, True), ({"recipe": "attribution"}, True)])
def test_misplaced_task_returns_only_with_a_pull(extra, returns):
    options = dict(extra, init="prior", prior=_wrong_start())
    data, runs = run_preset("multimnist", ("dmtg",), options={"dmtg": options})
    res = runs["dmtg"]
    first = res.extra["dmtg_history"][0]["assignment_probs"][0]  # left_even after epoch 0 (S held fixed)
    assert first[1] > 0.9
    found = sorted(sorted(g) for g in res.grouping.groups)
    assert (found == sorted(sorted(g) for g in data.groups)) is returns, found
