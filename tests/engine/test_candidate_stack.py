"""Candidate networks trained as one stack (the ``stacked`` fan-out backend): each candidate's result is the
one it gets alone - bit for bit with the trunks in a loop, to float rounding stacked - with its own
selection and early stopping; settings that would couple the candidates are refused."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as load_tensors

from taskgrouping.data.registry import load_dataset
from taskgrouping.engine.fit import RunContext
from taskgrouping.engine.jobs import TrainingJob, run_jobs
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.grouping.grouping import Grouping


@pytest.fixture(scope="module")
def ctx() -> RunContext:
    data = load_dataset("digits", seed=0)
    # early stopping with patience 1 and a large step: the candidates stop after different epochs
    return RunContext(data, seed=3, train=TrainConfig(epochs=10, batch_size=128, lr=3e-2, early_stopping=1,
                                                      progress=False),
                      model={"backbone": "mlp", "options": {"widths": [16, 8]}, "shared_blocks": 0},
                      balancer={"name": "ew", "options": {}})


def _jobs() -> list[TrainingJob]:
    return [TrainingJob("a", Grouping.partition([["even"]])),
            TrainingJob("b", Grouping.partition([["gt4", "loop"]])),
            TrainingJob("c", Grouping.partition([["even", "prime"]])),  # a task another candidate trains too
            TrainingJob("d", Grouping.partition([["prime"]]), model_options={"widths": [8, 4]})]  # trains alone


def _weights(result) -> dict[str, torch.Tensor]:
    return load_tensors(result.weights)


def test_a_stack_gives_every_candidate_its_result_alone_bit_for_bit(ctx):
    alone = run_jobs(ctx, _jobs(), backend="sequential")
    stacked = run_jobs(ctx, _jobs(), backend="stacked")
    assert [r.tag for r in stacked] == ["a", "b", "c", "d"]
    for s, r in zip(alone, stacked):
        assert (r.val, r.test, r.best_epoch, r.epochs_run) == (s.val, s.test, s.best_epoch, s.epochs_run), r.tag
        ws, wr = _weights(s), _weights(r)
        assert ws.keys() == wr.keys() and all(torch.equal(ws[k], wr[k]) for k in ws), r.tag
        assert [h["epoch"] for h in r.history] == [h["epoch"] for h in s.history]
        assert [h["train_loss"] for h in r.history] == [h["train_loss"] for h in s.history]
    # the selection is each candidate's own: they stopped after different epochs within one stack
    assert len({r.epochs_run for r in stacked[:3]}) > 1 and max(r.epochs_run for r in stacked[:3]) < 10


def test_workers_caps_the_networks_in_one_stack(ctx, monkeypatch):
    import taskgrouping.engine.candidate_stack as candidate_stack

    sizes = []
    real = candidate_stack.train_stack
    monkeypatch.setattr(candidate_stack, "train_stack", lambda run, jobs: sizes.append(len(jobs)) or real(run, jobs))
    run = replace(ctx, train=replace(ctx.train, epochs=1))
    results = run_jobs(run, _jobs(), backend="stacked", workers=2)
    assert sizes == [2] and [r.tag for r in results] == ["a", "b", "c", "d"]  # c and d train alone


def test_stacked_trunks_give_the_loops_results_to_float_rounding(ctx):
    run = replace(ctx, train=replace(ctx.train, branches="stacked", early_stopping=0, epochs=2))
    loop = run_jobs(replace(run, train=replace(run.train, branches="loop")), _jobs()[:3], backend="stacked")
    stacked = run_jobs(run, _jobs()[:3], backend="stacked")
    for a, b in zip(loop, stacked):
        for t in a.test:
            assert b.test[t]["loss"] == pytest.approx(a.test[t]["loss"], rel=1e-4)


@pytest.mark.parametrize("change,match", [
    ({"balancer": {"name": "pcgrad", "options": {}}}, "balancer 'pcgrad'"),
    ({"train": TrainConfig(grad_clip=1.0, progress=False)}, "train.grad_clip=1.0"),
    ({"train": TrainConfig(schedule="plateau", progress=False)}, "plateau"),
    ({"diagnostics": {"every": 5}}, "diagnostics"),
])
def test_settings_that_couple_the_candidates_are_refused(ctx, change, match):
    with pytest.raises(ValueError, match=match):
        run_jobs(replace(ctx, **change), _jobs(), backend="stacked")


def test_the_stack_ends_once_every_candidate_has_stopped(ctx, monkeypatch):
    import taskgrouping.engine.candidate_stack as candidate_stack

    epochs_trained = []
    real_train = candidate_stack.train

    def train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        epochs_trained.append(len(result.history))
        return result
    monkeypatch.setattr(candidate_stack, "train", train)
    trained_batches = {}  # candidate -> training forward passes of its trunk (a stopped candidate runs no more)
    real_build = candidate_stack.CandidateStack.__init__

    def count(self, networks):
        real_build(self, networks)
        for k, branch in enumerate(self.joined.branches):
            trained_batches[k] = 0

            def hook(module, inputs, output, k=k):
                trained_batches[k] += module.training
            branch.register_forward_hook(hook)
    monkeypatch.setattr(candidate_stack.CandidateStack, "__init__", count)
    results = run_jobs(ctx, _jobs()[:3], backend="stacked")
    assert epochs_trained == [max(r.epochs_run for r in results)] and epochs_trained[0] < ctx.train.epochs
    batches = -(-len(ctx.data.train) // ctx.train.batch_size)
    assert [trained_batches[k] for k in range(3)] == [r.epochs_run * batches for r in results]


def _without_time(state: dict) -> dict:
    state = dict(state, history=[{k: v for k, v in h.items() if k != "seconds"} for h in state["history"]])
    state.pop("elapsed")
    return state


def test_a_stacked_candidate_ends_with_the_checkpoint_of_its_own_training(ctx, tmp_path):
    """What a candidate's own training would have left in its checkpoint directory (the weights, best
    weights, optimiser and scheduler state when it stopped, history and best epoch; times aside), so that
    ESA's continuation from it (``init_from``) equals continuing the network trained alone."""
    from taskgrouping.engine.checkpoint import Checkpoint

    run = replace(ctx, train=replace(ctx.train, schedule="step", step_size=2, gamma=0.5))

    def jobs(where: str, **kw) -> list[TrainingJob]:
        return [replace(j, checkpoint_dir=str(tmp_path / where / j.tag), **kw) for j in _jobs()[:3]]

    alone = run_jobs(run, jobs("alone"), backend="sequential")
    stacked = run_jobs(run, jobs("stacked"), backend="stacked")
    for a, s in zip(alone, stacked):
        (wa, ba, oa, sa), (ws, bs, os_, ss) = (Checkpoint(tmp_path / d / a.tag).load() for d in ("alone", "stacked"))
        assert all(torch.equal(wa[n], ws[n]) for n in wa) and all(torch.equal(ba[n], bs[n]) for n in ba)
        assert oa["param_groups"] == os_["param_groups"]
        assert all(torch.equal(oa["state"][i][n], os_["state"][i][n]) for i in oa["state"] for n in oa["state"][i])
        assert _without_time(sa) == _without_time(ss)
    # continued alone for 3 more epochs from either checkpoint: the same network
    more = replace(run, train=replace(run.train, early_stopping=0))
    cont = [run_jobs(more, [replace(j, checkpoint_dir=str(tmp_path / f"{where}-more" / j.tag), epochs=13,
                                    init_from=str(tmp_path / where / j.tag), continues_from=10)
                            for j in _jobs()[:3]], backend="sequential") for where in ("alone", "stacked")]
    for a, s in zip(*cont):
        assert (a.val, a.test) == (s.val, s.test)
