"""The ``dmtg`` method end to end: it records its history, pinned to a grouping it trains like that grouping,
and it draws its assignment heatmap."""

import pytest
import torch

from dmtg_fixtures import method_ctx, small_data
from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.dmtg import dmtg


def test_dmtg_method_end_to_end_records_history():
    data = small_data()
    res = dmtg(method_ctx(data, 2, {"recipe": "robust", "retrain": ["scratch"]}))
    assert isinstance(res.grouping, Grouping) and sorted(res.grouping.tasks) == sorted(data.task_names)
    assert set(res.per_task) == set(data.task_names)
    # the robust recipe holds S fixed for its 3 warm-up epochs, and no head is pruned while S is not learning
    assert res.extra["live_heads_history"] == [2 * len(data.tasks)] * 3 == [res.extra["live_heads_final"]] * 3
    assert "retrain_scratch" in res.extra["variants"]
    # results.json records the options the recipe resolved, and what init=auto chose
    recorded = res.extra["options"]
    assert recorded["tau"] == 1.0 and recorded["retrain"] == ["scratch"] and recorded["init_used"] == "labels"


def test_the_default_recipe_learns_s_from_a_random_start_after_a_fraction_of_the_run():
    """No label statistics: S starts as small noise, is held for round(0.4 x 3) = 1 epoch (every head trains),
    then learns for the run's 3 epochs (no early stopping: the held epoch is added) and, S not having converged
    by then, up to 3 more (``converge_extension`` 1 x train.epochs); results.json records the recipe, the
    resolved hold and the epochs trained."""
    res = dmtg(method_ctx(small_data(), 2, {}))
    recorded = res.extra["options"]
    assert recorded["recipe"] == "attribution" and recorded["init"] == "noisy" and "init_used" not in recorded
    assert recorded["s_warmup_epochs"] == 1 and recorded["attribution_weight"] > 0
    assert res.extra["epochs"] == 4 and res.extra["epochs_added"] == 3 == len(res.extra["dmtg_history"]) - 4
    probs = [torch.tensor(h["assignment_probs"]) for h in res.extra["dmtg_history"]]
    assert probs[0].max() < 0.7  # held at the start: logits of std 0.1, no group favoured
    assert not torch.equal(probs[1], probs[0])  # then learned
    assert res.extra["live_heads_history"][0] == 2 * len(small_data().tasks)  # nothing pruned while S is held


def test_the_hold_is_added_only_to_a_run_without_early_stopping():
    import dataclasses

    ctx = method_ctx(small_data(), 2, {"s_warmup_epochs": 2})
    assert dmtg(ctx).extra["epochs"] == 5
    stopping = dataclasses.replace(ctx, train=dataclasses.replace(ctx.train, early_stopping=10))
    assert dmtg(stopping).extra["epochs"] == 3
    assert dmtg(dataclasses.replace(ctx, options={"s_warmup_epochs": 2, "add_hold_epochs": False})).extra["epochs"] == 3


def test_a_run_that_would_end_before_s_has_converged_goes_on_until_it_has():
    """3 steps an epoch leave S unconverged after the run's 3 epochs (+1 held): without the extension the
    result says so; with room for it, training goes on one epoch at a time and ends at the epoch S converged
    (one live head per task), on the planted groups."""
    data = small_data()
    cut = dmtg(method_ctx(data, 2, {"converge_extension": 0.0})).extra
    assert cut["s_converged_epoch"] is None and cut["epochs_run"] == 4 and cut["live_heads_final"] > len(data.tasks)
    assert "had not converged" in cut["warning"]
    res = dmtg(method_ctx(data, 2, {"converge_extension": 10.0}))
    done = res.extra
    assert done["epochs_run"] == done["s_converged_epoch"] + 1 == 4 + done["epochs_added"] <= 4 + 30
    assert done["live_heads_final"] == len(data.tasks) and "warning" not in done
    assert sorted(sorted(g) for g in res.grouping.groups) == sorted(sorted(g) for g in data.groups)


def test_a_run_killed_while_extended_resumes_to_the_same_result(tmp_path):
    """Killed in the epochs added while S had not converged (after epoch 9 of the planned 4), resumed from
    its checkpoint: the same convergence epoch, epochs added, grouping and test losses as uninterrupted."""
    import dataclasses

    data = small_data()
    options = {"converge_extension": 10.0}
    whole = dmtg(dataclasses.replace(method_ctx(data, 2, options), workdir=tmp_path / "whole"))

    class Killed(Exception):
        """Stands for the process being killed."""

    def kill_after_epoch_9(record):
        if record.get("epoch") == 9:
            raise Killed

    killed = dataclasses.replace(method_ctx(data, 2, options), workdir=tmp_path / "cut", log=kill_after_epoch_9)
    with pytest.raises(Killed):
        dmtg(killed)
    resumed = dmtg(dataclasses.replace(method_ctx(data, 2, options), workdir=tmp_path / "cut", resume=True))
    for key in ("s_converged_epoch", "epochs_added", "epochs_run", "live_heads_final"):
        assert resumed.extra[key] == whole.extra[key], key
    assert whole.extra["epochs_added"] > 6  # the kill came inside the extension
    assert resumed.grouping.as_lists() == whole.grouping.as_lists() and resumed.per_task == whole.per_task


def test_dmtg_pinned_to_a_grouping_trains_like_that_grouping():
    """DMTG starts from the weights the grouped model of its initial assignment would have at this seed
    (each task's head copied into every branch). With S pinned to the planted grouping (logit gap 30:
    Gumbel weights of other groups ~1e-13; S frozen; no pruning) its one-shot result is therefore that
    grouping trained from scratch: same selected epoch, same test losses. So on planted, DMTG vs the
    oracle measures what S's learning costs or gains, not initialisation luck."""
    from taskgrouping.methods.baselines import fit_grouping

    data = small_data()
    grouping = Grouping.partition([list(g) for g in data.groups])
    prior = [[30.0 if t in g else 0.0 for g in grouping.as_lists()] for t in data.task_names]
    got = dmtg(method_ctx(data, 2, {"recipe": "robust", "init": "prior", "prior": prior, "s_warmup_epochs": 1000,
                              "head_pruning": False, "samples": 1}))
    ref = fit_grouping(method_ctx(data, 2, {}), grouping, "oracle")
    assert got.grouping.as_lists() == grouping.as_lists()
    assert got.extra["best_epoch"] == ref.extra["best_epoch"]
    for t in data.task_names:
        assert got.per_task[t]["loss"] == pytest.approx(ref.per_task[t]["loss"], rel=1e-4)


def test_assignment_heatmap_is_written(tmp_path):
    import dataclasses

    ctx = dataclasses.replace(method_ctx(small_data(), 2, {}), figures_dir=tmp_path)
    res = dmtg(ctx)
    png = tmp_path / "dmtg_assignment.png"
    assert res.extra["assignment_figure"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 3 epochs, the held one and those added while S had not converged
    assert len(res.extra["dmtg_history"]) == res.extra["epochs_run"] == 4 + res.extra["epochs_added"]
    assert len(res.extra["dmtg_history"][0]["assignment_probs"]) == 4


def test_s_held_for_a_third_of_the_run_and_an_epoch_after_the_hold_returned():
    """S's start is not DMTG's result: with S held for round(6 / 3) = 2 epochs, the selected epoch comes after
    the hold, and S stays at its start during the hold."""
    import dataclasses

    data = small_data()
    ctx = method_ctx(data, 2, {"recipe": "attribution", "s_warmup_fraction": 1 / 3})
    ctx = dataclasses.replace(ctx, train=dataclasses.replace(ctx.train, epochs=6))
    res = dmtg(ctx)
    assert res.extra["options"]["s_warmup_epochs"] == 2 and res.extra["options"]["s_warmup_fraction"] == 1 / 3
    probs = [h["assignment_probs"] for h in res.extra["dmtg_history"]]
    assert probs[0] == probs[1] != probs[2]
    assert res.extra["best_epoch"] >= 2
