"""One rank of the two-rank checks in test_distributed.py (run as a script with torchrun's variables:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and the same scenarios in one process for reference.

``python distributed_worker.py OUT`` writes ``OUT/rank<r>.json``: per scenario what the test compares
with one process (final weights and losses of every balancer, DMTG's Gumbel draws and the logits they
were drawn from). The experiments write their results directories under ``OUT`` (rank 0 only).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

EPOCHS = 1
#: (name, --set overrides) of the experiments the issue's check runs, on the digits preset
EXPERIMENTS = {
    "pcgrad": ["balancer.name=pcgrad"],
    "uw": ["balancer.name=uw"],
    "pcgrad_feature": ["balancer.name=pcgrad", "balancer.options.feature_level=true"],
    # the attribution pull measured on more rows than a rank's slice holds: gathered from both ranks
    "attribution": ["dmtg.recipe=attribution", "dmtg.attribution_samples=200", "dmtg.attribution_every=1",
                    "train.epochs=2"],
    "other_methods": ["methods=[single_task,random,label_clusters,cross_stitch,mtan,interrogate]"],
}
#: every balancer at parameter level, the gradient methods at feature level, two with batch-summed features
PARAM = ("ew", "uw", "rlw", "dwa", "famo", "pcgrad", "gradvac", "graddrop", "rgw", "mgda", "cagrad", "nash_mtl",
         "aligned_mtl", "imtl", "cosreg", "gradnorm", "auto_lambda")
FEATURE = ("ew", "pcgrad", "gradvac", "graddrop", "rgw", "mgda", "mgda_ub", "cagrad", "nash_mtl", "aligned_mtl",
           "aligned_mtl_ub", "imtl", "cosreg", "gradnorm", "auto_lambda")
BATCH = ("pcgrad", "graddrop", "cosreg")


def experiment_config(overrides: list[str]) -> dict:
    from taskgrouping.config import build_config

    return build_config(preset="digits", overrides=[
        "methods=[naive_mtl,dmtg]", f"train.epochs={EPOCHS}", "train.batch_size=256", "train.progress=false",
        "dmtg.s_warmup_epochs=0",
        *overrides])


def balancer_variants() -> list[tuple[str, str, dict]]:
    out = [(f"{n}/param", n, {}) for n in PARAM]
    out += [(f"{n}/feature", n, {"feature_level": True}) for n in FEATURE if n not in ("mgda_ub", "aligned_mtl_ub")]
    out += [(f"{n}/feature", n, {}) for n in ("mgda_ub", "aligned_mtl_ub")]
    out += [(f"{n}/batch", n, {"feature_level": True, "feature_reduction": "batch"}) for n in BATCH]
    return out


@functools.lru_cache(maxsize=1)
def small_data():
    """Planted regression, 4 tasks in 2 groups; about 20 % of the labels missing, and task g0_t0 labelled
    on 3 samples only (so that a batch holds one of them while a rank's slice of it holds none: that
    rank's objective leaves the task out, and the ranks must still agree on the tasks and their order)."""
    from taskgrouping.data.builtin import planted

    data = planted(n_tasks=4, group_sizes=[2, 2], input_dim=8, feature_dim=3, n_train=96, n_val=40, n_test=40,
                   seed=3)
    g = torch.Generator().manual_seed(0)
    for name, y in data.train.targets.items():
        keep = torch.rand(y.shape[0], generator=g) < 0.8
        if name == "g0_t0":
            keep = torch.zeros_like(keep)
            keep[torch.randperm(y.shape[0], generator=g)[:3]] = True
        y[~keep] = float("nan")
    return data


def train_balancer(name: str, options: dict, shard: tuple[int, int] | None, epochs: int = 1,
                   checkpoint_dir: Path | None = None, resume: bool = False) -> dict:
    """Train a 2-branch MLP with ``name`` for ``epochs`` (3 steps each, SGD); its weights and train losses."""
    from taskgrouping.balancing.base import get_balancer
    from taskgrouping.data.base import make_loader
    from taskgrouping.engine.trainer import TrainConfig, train
    from taskgrouping.models.branched import build_branched_model

    data = small_data()
    torch.manual_seed(0)
    model = build_branched_model(data.tasks, [data.task_names[:2], data.task_names[2:]], data.input_shape,
                                 backbone="mlp", backbone_options={"widths": [16, 8]})
    cfg = TrainConfig(epochs=epochs, batch_size=32, optimizer="sgd", lr=0.05, progress=False, select="last")
    balancer = get_balancer(name, tasks=data.task_names, **options)
    result = train(model, make_loader(data.train, 32, True, shard=shard), make_loader(data.val, 32, False, shard=shard),
                   data.tasks, cfg, seed=1, balancer=balancer, checkpoint_dir=checkpoint_dir, resume=resume)
    return {"weights": torch.cat([p.detach().reshape(-1) for p in result.model.parameters()]).tolist(),
            "train_loss": [h["train_loss"] for h in result.history], "val": [h["val"] for h in result.history]}


def record_draws():
    """Wrap ``F.gumbel_softmax`` so that every draw (and the logits it was drawn from) is recorded."""
    import torch.nn.functional as F

    draws: list[dict] = []
    original = F.gumbel_softmax

    def recording(logits, *args, **kw):
        z = original(logits, *args, **kw)
        draws.append({"logits": logits.detach().flatten().tolist(), "z": z.detach().flatten().tolist()})
        return z
    F.gumbel_softmax = recording
    return draws, lambda: setattr(F, "gumbel_softmax", original)


def run_experiments(out: Path) -> dict:
    """The issue's experiments (each into ``out/<name>``), then the first one resumed after losing its
    DMTG record and results; DMTG's draws per experiment."""
    from taskgrouping.engine.distributed import Ranks
    from taskgrouping.experiment import run_experiment

    found = {}
    for name, overrides in EXPERIMENTS.items():
        draws, restore = record_draws()
        try:
            run_experiment(experiment_config(overrides), out / name, echo=lambda s: None)
        finally:
            restore()
        found[name] = draws
    ranks = Ranks.current()
    if ranks.is_main:
        shutil.copytree(out / "pcgrad", out / "pcgrad_resumed")
        for name in ("results.json", "table.md", "partial/dmtg.json"):
            (out / "pcgrad_resumed" / name).unlink()
    ranks.barrier()
    run_experiment(experiment_config(EXPERIMENTS["pcgrad"]), out / "pcgrad_resumed", resume=True,
                   echo=lambda s: None)
    return found


def run_balancers(shard: tuple[int, int] | None) -> dict:
    out = {}
    for tag, name, options in balancer_variants():
        try:
            out[tag] = train_balancer(name, options, shard)
        except Exception as exc:  # the same error in one process is the expected outcome then
            out[tag] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def run_resume(shard: tuple[int, int] | None, folder: Path) -> dict:
    """Two epochs straight, and one epoch then resumed to two (rank 0 holds the checkpoint)."""
    straight = train_balancer("pcgrad", {}, shard, epochs=2)
    train_balancer("pcgrad", {}, shard, epochs=1, checkpoint_dir=folder)
    resumed = train_balancer("pcgrad", {}, shard, epochs=2, checkpoint_dir=folder, resume=True)
    return {"straight": straight, "resumed": resumed}


def main(out: Path) -> None:
    from taskgrouping.engine.distributed import setup

    ranks = setup("cpu")
    shard = (ranks.rank, ranks.world)
    report = {"balancers": run_balancers(shard),
              "resume": run_resume(shard, out / f"ckpt{ranks.rank}"),
              "draws": run_experiments(out)}
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
