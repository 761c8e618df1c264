"""The branched model: pruning keeps outputs, warm starts copy weights, shared stems are shared."""

import pytest
import torch

from taskgrouping.models.branched import build_branched_model
from taskgrouping.tasks import Task

TASKS = [Task("a", "binary"), Task("b", "regression"), Task("c", "multiclass", num_classes=3)]


def test_prune_keeps_serving_heads_exactly():
    torch.manual_seed(0)
    m = build_branched_model(TASKS, [["a", "b", "c"]] * 3, (6,), backbone="mlp", serves={"a": 2, "b": 0, "c": 2})
    x = torch.randn(5, 6)
    full, _ = m.forward_heads(x)
    p = m.prune()
    assert len(p.branches) == 2 and sum(len(g) for g in p.groups) == 3
    out = p(x)
    for t, k in m.serves.items():
        assert torch.equal(out[t], full[(k, t)])


def test_warm_start_copies_naive_weights_into_every_branch():
    torch.manual_seed(0)
    naive = build_branched_model(TASKS, [["a", "b", "c"]], (6,))
    grouped = build_branched_model(TASKS, [["a", "b"], ["c"]], (6,))
    grouped.load_from_single_branch(naive)
    x = torch.randn(4, 6)
    ref = naive(x)
    out = grouped(x)
    for t in ref:
        assert torch.equal(out[t], ref[t])


def test_shared_stem_is_one_module():
    m = build_branched_model(TASKS, [["a"], ["b"], ["c"]], (6,), backbone="mlp", shared_blocks=1)
    assert len(m.stem) == 1 and all(len(b) == 1 for b in m.branches)
    stem_params = {id(p) for p in m.stem.parameters()}
    assert stem_params and stem_params <= {id(p) for p in m.shared_parameters()}


@pytest.mark.parametrize("groups, msg", [([["a", "b"], []], "empty"), ([["a", "zz"], ["b", "c"]], "unknown task 'zz'"),
                                         ([["a"], ["b"]], r"\['c'\] are in no group")])
def test_bad_groupings(groups, msg):
    with pytest.raises(ValueError, match=msg):
        build_branched_model(TASKS, groups, (6,))
