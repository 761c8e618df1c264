"""InterroGate (Bejnordi et al., ICML 2024): learn, per layer, channel and task, whether the task
reads its own features or the shared ones, under a compute budget; then prune what no task uses.

InterroGate is *not* a grouping method: every task keeps its own (partly shared) path, so its
:class:`~taskgrouping.methods.base.MethodResult` reports the trivial grouping "all tasks in one
group" and puts what it learned - the per-layer sharing pattern, FLOPs and parameters before and
after compiling - in ``extra``.

Training (paper Sec. 3): the gated network of :mod:`taskgrouping.models.gated` is trained on

    Σ_t ω_t L_t  +  λ_s · mean_t max(0, mean_ℓ mean_c σ(α_t^ℓ) − τ_t)          (hinge, default)
    Σ_t ω_t L_t  +  λ_s · mean_t mean_ℓ mean_c σ(α_t^ℓ)                        (``sparsity: l1``)

The network's weights are updated by the run's optimiser (``train:`` section); the gates (α, β)
by their own optimiser, stepped in the objective's ``after_step`` hook.

Gate optimiser and λ_s scale (measured on MultiMNIST, 8 tasks, small_cnn, batch 128): the task
losses give each α a gradient of about 1e-3, the sparsity term λ_s·σ'(α)/(T·L·C_ℓ), i.e. about
3e-4·λ_s. With the paper's SGD at lr 0.1 an α moves by < 0.1 in a few hundred steps, so no gate
ever flips and the method silently stays at its initialisation (STL). The defaults are therefore
Adam at lr 0.03 with gates starting at α = 0.5 (task-specific, close to the threshold), which
makes the gates move within a few epochs; ``gate_optimizer: sgd, gate_lr: 0.1`` gives the
paper's setting. Because the regulariser averages over layers and channels, the λ_s that trades
accuracy for FLOPs depends on the network and the run length: on MultiMNIST λ_s in the paper's
range {1,...,10}·10⁻² prunes little and the trade-off spans roughly λ_s ∈ [0.3, 30].
With ``init: baselines`` each task branch starts from the run's single-task network and the
shared branch (and the ungated stem, if ``model.shared_blocks`` > 0) from the naive-MTL network,
both trained by :mod:`taskgrouping.methods.baselines` with the same backbone; the heads come from
the single-task networks and the gates start task-specific (``gate_init`` > 0), so training
starts from the STL solution. After training the network is compiled to a static pruned network
(:meth:`~taskgrouping.models.gated.GatedNetwork.compile`), which is the method's model.

:func:`interrogate_sweep` runs the paper's accuracy / FLOPs trade-off over λ_s (Fig. 2) and plots
the sharing pattern (Fig. 3).
"""

from __future__ import annotations

import dataclasses

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from taskgrouping.grouping.grouping import Grouping
from taskgrouping.methods.base import MethodContext, MethodResult, register_method
from taskgrouping.methods.baselines import fit_grouping, naive_mtl_model
from taskgrouping.models.branched import BranchedModel
from taskgrouping.models.gated import (GatedNetwork, build_gated_network, count_flops, count_parameters,
                                       save_compiled)
from taskgrouping.tasks import Task
from taskgrouping.engine.evaluation import evaluate
from taskgrouping.engine.hooks import ObjectiveBase, StepOutput

#: Defaults (see the module docstring for why the gates' optimiser is not the paper's SGD 0.1).
DEFAULT_OPTIONS: dict[str, Any] = {
    "lambda_s": 1.0,
    "tau": 0.2,
    "sparsity": "hinge",
    "gate_lr": 0.03,
    "gate_optimizer": "adam",
    "init": "baselines",
    "omega": None,
    "gate_init": 0.5,
    "weight_lr_scale": 0.1,
    "epochs": None,
}
SPARSITY_KINDS = ("hinge", "l1")
GATE_OPTIMIZERS = ("sgd", "adam")
INITS = ("baselines", "scratch")
DEFAULT_LAMBDAS = (0.01, 0.03, 0.05, 0.07, 0.10)
NOT_A_GROUPING = ("InterroGate is not a grouping method: every task keeps its own partly shared path; the grouping "
                  "is reported as one group of all tasks and the learned sharing is in 'sharing_pattern'")


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InterroGateOptions:
    """Validated options (see :data:`DEFAULT_OPTIONS`; ``tau`` and ``omega`` resolved per task)."""

    lambda_s: float
    tau: dict[str, float]
    sparsity: str
    gate_lr: float
    gate_optimizer: str
    init: str
    omega: dict[str, float]
    gate_init: float
    #: the network weights' learning rate = train.lr x this (below 1 fine-tunes the STL / MTL weights gently
    #: while the gates learn, which small datasets need: at the full rate they overfit before gates move)
    weight_lr_scale: float = 0.1


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"interrogate.{key} must be a number, got {value!r}")
    return float(value)


def _per_task(key: str, value: Any, tasks: Sequence[Task], default: Mapping[str, float], low: float,
              high: float) -> dict[str, float]:
    """A number for every task, or a {task: number} mapping covering every task, within [low, high]."""
    names = [t.name for t in tasks]
    if value is None:
        out = dict(default)
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"interrogate.{key} names unknown task(s) {unknown}; tasks are {names}")
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"interrogate.{key} has no value for task(s) {missing}; give a number for every task "
                             "or a single number for all")
        out = {n: _number(f"{key}.{n}", value[n]) for n in names}
    else:
        v = _number(key, value)
        out = {n: v for n in names}
    for n, v in out.items():
        if not low <= v <= high:
            raise ValueError(f"interrogate.{key} for task {n!r} is {v}, outside [{low}, {high}]")
    return out


def parse_options(options: Mapping[str, Any], tasks: Sequence[Task]) -> InterroGateOptions:
    """Check InterroGate's options; every error names the key and what was expected."""
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown interrogate option(s) {unknown}; expected some of {sorted(DEFAULT_OPTIONS)}")
    o = dict(DEFAULT_OPTIONS, **options)
    epochs = o["epochs"]
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"interrogate.epochs must be a positive integer (or null = train.epochs), got {epochs!r}")
    lambda_s = _number("lambda_s", o["lambda_s"])
    if lambda_s < 0:
        raise ValueError(f"interrogate.lambda_s must be >= 0, got {lambda_s}")
    gate_lr = _number("gate_lr", o["gate_lr"])
    if gate_lr <= 0:
        raise ValueError(f"interrogate.gate_lr must be > 0, got {gate_lr}")
    for key, allowed in (("sparsity", SPARSITY_KINDS), ("gate_optimizer", GATE_OPTIMIZERS), ("init", INITS)):
        if o[key] not in allowed:
            raise ValueError(f"interrogate.{key} must be one of {list(allowed)}, got {o[key]!r}")
    tau = _per_task("tau", o["tau"], tasks, {}, 0.0, 1.0)
    omega = _per_task("omega", o["omega"], tasks, {t.name: float(t.weight) for t in tasks}, 0.0, math.inf)
    weight_lr_scale = _number("weight_lr_scale", o["weight_lr_scale"])
    if weight_lr_scale <= 0:
        raise ValueError(f"interrogate.weight_lr_scale must be > 0, got {weight_lr_scale}")
    return InterroGateOptions(lambda_s, tau, o["sparsity"], gate_lr, o["gate_optimizer"], o["init"], omega,
                              _number("gate_init", o["gate_init"]), weight_lr_scale)


# ---------------------------------------------------------------------------------------------
# Loss and objective
# ---------------------------------------------------------------------------------------------

def sparsity_loss(alphas: Sequence[Tensor], tau: Tensor | float, kind: str = "hinge") -> Tensor:
    """InterroGate's sparsity regulariser (without λ_s).

    ``u_t = mean_ℓ mean_c σ(α_t^ℓ)`` is task t's soft share of task-specific channels; ``hinge``
    returns ``mean_t max(0, u_t − τ_t)`` (paper Eq. 5: no pressure once the task is within its
    budget τ_t), ``l1`` returns ``mean_t u_t`` (the paper's ablation without a target).

    Args:
        alphas: gate logits per gated layer, each ``T × C_ℓ``.
        tau: per-task targets ``(T,)`` or one number.
    """
    if kind not in SPARSITY_KINDS:
        raise ValueError(f"sparsity must be one of {list(SPARSITY_KINDS)}, got {kind!r}")
    if not alphas:
        raise ValueError("sparsity_loss needs the gate logits of at least one layer")
    usage = torch.stack([torch.sigmoid(a).mean(1) for a in alphas]).mean(0)
    if kind == "l1":
        return usage.mean()
    tau = torch.as_tensor(tau, dtype=usage.dtype, device=usage.device)
    return torch.relu(usage - tau).mean()


def make_gate_optimizer(params: Iterable[nn.Parameter], kind: str, lr: float) -> torch.optim.Optimizer:
    """The gates' own optimiser: plain SGD (the paper's) or Adam."""
    params = list(params)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"gate_optimizer must be one of {list(GATE_OPTIMIZERS)}, got {kind!r}")


class InterroGateObjective(ObjectiveBase):
    """The trainer's step for InterroGate (see the module docstring for the loss).

    The returned ``losses`` are the weighted task losses ``ω_t L_t`` (the balancer combines them);
    the sparsity term is the ``extra_loss``. The main optimiser sees only the network's weights
    (:meth:`param_groups`); :meth:`after_step` steps the gates' optimiser and clears their grads.
    """

    def __init__(self, model: GatedNetwork, tasks: Sequence[Task], options: InterroGateOptions,
                 base_lr: float | None = None) -> None:
        self.base_lr = base_lr
        self.tasks = {t.name: t for t in tasks}
        if list(self.tasks) != model.task_names:
            raise ValueError(f"the gated network's tasks {model.task_names} differ from {list(self.tasks)}")
        self.options = options
        self.tau = torch.tensor([options.tau[t] for t in model.task_names])
        self.omega = options.omega
        self.gate_optimizer = make_gate_optimizer(model.gate_parameters(), options.gate_optimizer, options.gate_lr)
        self._reg_sum = 0.0
        self._steps = 0

    def __call__(self, model: GatedNetwork, x: Tensor, targets: dict[str, Tensor]) -> StepOutput:
        preds = model(x)
        losses = {t: self.omega[t] * task.loss(preds[t], targets[t]) for t, task in self.tasks.items()}
        extra = None
        if self.options.lambda_s > 0:
            alphas = [g.alpha for g in model.gate_points().values()]
            extra = self.options.lambda_s * sparsity_loss(alphas, self.tau.to(x.device), self.options.sparsity)
            self._reg_sum += float(extra.detach())
        self._steps += 1
        return StepOutput(losses, extra_loss=extra)

    def param_groups(self, model: GatedNetwork) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": model.weight_parameters()}
        if self.base_lr is not None and self.options.weight_lr_scale != 1.0:
            group["lr"] = self.base_lr * self.options.weight_lr_scale
        return [group]

    def after_step(self) -> None:
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)

    def on_epoch_start(self, epoch: int, model: GatedNetwork) -> None:
        self._reg_sum, self._steps = 0.0, 0

    def on_epoch_end(self, epoch: int, model: GatedNetwork) -> dict[str, Any]:
        hard = model.hard_gates()
        names = model.task_names
        frac = {t: float(torch.stack([m[i].float().mean() for m in hard.values()]).mean()) for i, t in enumerate(names)}
        usage = model.gate_usage().detach()
        return {"gates": {"task_specific_fraction": frac, "soft_usage": dict(zip(names, usage.tolist())),
                          "sparsity_loss": self._reg_sum / max(self._steps, 1)}}

    def state_dict(self) -> dict[str, Any]:
        sd = self.gate_optimizer.state_dict()
        state = {str(k): {n: (v.tolist() if isinstance(v, Tensor) else v) for n, v in st.items()}
                 for k, st in sd["state"].items()}
        return {"gate_optimizer": {"state": state, "param_groups": sd["param_groups"]}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        opt = state["gate_optimizer"]
        restored = {int(k): {n: torch.tensor(v, dtype=torch.float32) for n, v in st.items()}
                    for k, st in opt["state"].items()}
        self.gate_optimizer.load_state_dict({"state": restored, "param_groups": opt["param_groups"]})


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------

def single_task_model(ctx: MethodContext) -> BranchedModel:
    """The run's trained single-task model (N branches; trained now, under
    ``warm_start_single_task/``, unless a method already put it in ``ctx.cache``)."""
    if "single_task_model" not in ctx.cache:
        grouping = Grouping.partition([[t] for t in ctx.data.task_names], method="single_task")
        res = fit_grouping(ctx, grouping, "warm_start_single_task")
        ctx.cache["single_task_model"] = res.model
        ctx.cache["single_task_seconds"] = res.train_seconds
    return ctx.cache["single_task_model"]


def build_interrogate_model(ctx: MethodContext, options: InterroGateOptions) -> tuple[GatedNetwork, float]:
    """The gated network for the run's tasks and backbone, and the seconds spent training the
    baselines it starts from (0 when they were cached)."""
    names = ctx.data.task_names
    if options.init == "baselines":
        before = {k for k in ("naive_mtl_model", "single_task_model") if k in ctx.cache}
        mtl = naive_mtl_model(ctx)
        stl = single_task_model(ctx)
        seconds = sum(ctx.cache.get(k.replace("_model", "_seconds"), 0.0)
                      for k in ("naive_mtl_model", "single_task_model") if k not in before)
        shared, stem = mtl.branches[0], mtl.stem
        tasks = {t: stl.branches[stl.serves[t]] for t in names}
        heads = {t: stl.head(stl.serves[t], t) for t in names}
    else:
        groups = [(t,) for t in names] + [tuple(names)]
        fresh = ctx.build_model(Grouping(tuple(groups), {t: i for i, t in enumerate(names)}))
        shared, stem, seconds = fresh.branches[len(names)], fresh.stem, 0.0
        tasks = {t: fresh.branches[i] for i, t in enumerate(names)}
        heads = {t: fresh.head(i, t) for i, t in enumerate(names)}
    return build_gated_network(shared, tasks, heads, stem=stem, gate_init=options.gate_init), seconds


def reference_flops(ctx: MethodContext) -> dict[str, int]:
    """FLOPs of the run's single-task and naive-MTL networks (same backbone and heads)."""
    names = ctx.data.task_names
    shape = ctx.data.input_shape
    stl = ctx.cache.get("single_task_model")
    if stl is None:
        stl = ctx.build_model(Grouping.partition([[t] for t in names]))
    mtl = ctx.cache.get("naive_mtl_model")
    if mtl is None:
        mtl = ctx.build_model(Grouping.partition([names]))
    return {"single_task": count_flops(stl, shape), "naive_mtl": count_flops(mtl, shape)}


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    """Largest absolute difference between two ``{task: prediction}`` models' eval outputs on ``x``."""
    modes = a.training, b.training
    pa, pb = a.eval()(x), b.eval()(x)
    a.train(modes[0])
    b.train(modes[1])
    return max(float((pa[t].float() - pb[t].float()).abs().max()) for t in pa)


@register_method("interrogate", DEFAULT_OPTIONS)
def interrogate(ctx: MethodContext) -> MethodResult:
    """Learned per-channel sharing between task branches and a shared branch, pruned to a static
    network (Bejnordi et al. 2024). Not a grouping method: reports one group of all tasks."""
    opts = parse_options(ctx.options, ctx.data.tasks)
    model, baseline_seconds = build_interrogate_model(ctx, opts)
    objective = InterroGateObjective(model, ctx.data.tasks, opts, base_lr=ctx.train.lr)
    # The gated phase keeps its last epoch: the sparsity trade-off is where the schedule ends, and
    # restoring the best-validation epoch would undo the gates (it is often the first, before they move).
    # ``interrogate.epochs`` sets the length of this fine-tuning phase (default: train.epochs).
    epochs = ctx.options.get("epochs") or ctx.train.epochs
    gated_ctx = dataclasses.replace(ctx, train=dataclasses.replace(ctx.train, select="last", early_stopping=0,
                                                                   epochs=int(epochs)))
    result, val, _ = gated_ctx.fit(model, "interrogate", score_test=False, objective=objective)
    gated: GatedNetwork = result.model
    compiled = gated.compile().eval()
    device = next(gated.parameters()).device
    _, _, test_loader = ctx.loaders()
    test = evaluate(compiled, test_loader, ctx.data.tasks, device=device)
    x, _ = next(iter(test_loader))
    shape = ctx.data.input_shape
    pattern = gated.sharing_pattern()
    names = gated.task_names
    extra: dict[str, Any] = {
        "note": NOT_A_GROUPING,
        "options": asdict(opts),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "baseline_seconds": baseline_seconds,
        "flops": {"gated": count_flops(gated, shape), "compiled": count_flops(compiled, shape), **reference_flops(ctx)},
        "params": {"gated": count_parameters(gated, gated.gate_parameters()),
                   "gates": sum(p.numel() for p in gated.gate_parameters()),
                   "compiled": count_parameters(compiled)},
        "task_specific_fraction": {t: sum(r["task_specific_fraction"][t] for r in pattern) / len(pattern)
                                   for t in names},
        "sharing_pattern": pattern,
        "compile_max_abs_diff": max_output_difference(gated, compiled, x.to(device)),
        "gate_history": [h.get("gates") for h in result.history],
    }
    if ctx.workdir is not None:
        extra["compiled_dir"] = str(save_compiled(compiled, ctx.workdir / "compiled"))
    grouping = Grouping.partition([names], method="interrogate", note=NOT_A_GROUPING)
    return MethodResult(grouping, compiled, test, val, result.train_seconds + baseline_seconds, n_networks=1,
                        extra=extra)


# ---------------------------------------------------------------------------------------------
# Trade-off sweep (paper Fig. 2 and 3)
# ---------------------------------------------------------------------------------------------

def _check_sweep_args(lambdas: Sequence[float], seeds: Sequence[int]) -> tuple[list[float], list[int]]:
    lambdas = list(lambdas)
    seeds = list(seeds)
    if not lambdas:
        raise ValueError("interrogate sweep: give at least one lambda_s")
    for lam in lambdas:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"interrogate sweep: lambda_s values must be numbers >= 0, got {lam!r}")
    if len(set(lambdas)) != len(lambdas):
        raise ValueError(f"interrogate sweep: lambda_s values repeat: {lambdas}")
    if not seeds:
        raise ValueError("interrogate sweep: give at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"interrogate sweep: seeds must be integers, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"interrogate sweep: seeds repeat: {seeds}")
    return [float(x) for x in lambdas], seeds


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def interrogate_sweep(config: Mapping[str, Any], lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                      seeds: Sequence[int] = (0,), out_dir: Path | str = "runs/interrogate-sweep",
                      echo=print) -> dict[str, Any]:
    """InterroGate's accuracy / FLOPs trade-off over λ_s (paper Fig. 2) on one config.

    Per seed: naive MTL and STL are trained once (and reused by every λ_s as InterroGate's
    initialisation and reference), then InterroGate is trained for each λ_s with the config's
    ``interrogate:`` options. Δ_MTL is against STL on every task's primary metric
    (:func:`taskgrouping.metrics.delta_mtl`, InterroGate Eq. 6); FLOPs are the compiled network's.

    Writes ``sweep.json``, ``sweep.md`` (the table), ``tradeoff.png`` (Δ_MTL vs FLOPs with STL
    and naive MTL) and ``sharing_lambda_<λ>.png`` (task-specific fraction per layer and task, and
    which task dominates the shared mix via β; first seed) under ``out_dir``. Returns the summary
    (the table text under ``"table"``).
    """
    from taskgrouping.config import DEFAULTS, ConfigError, merge, validate
    from taskgrouping.experiment import prepare_data
    from taskgrouping.methods.base import METHODS
    from taskgrouping.metrics import delta_mtl
    from taskgrouping.engine.trainer import TrainConfig

    lambdas, seeds = _check_sweep_args(lambdas, seeds)
    cfg = merge(DEFAULTS, dict(config))
    cfg["methods"] = ["naive_mtl", "single_task", "interrogate"]
    validate(cfg)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {str(out)!r} is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    base_options = dict(cfg.get("interrogate") or {})
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        cfg_s = dict(cfg, seed=seed)
        data = prepare_data(cfg_s)
        parse_options(base_options, data.tasks)  # option errors before any training
        primary = {t.name: [t.primary_metric] for t in data.tasks}
        train_cfg = TrainConfig(**cfg["train"])
        cache: dict[str, Any] = {}
        seed_dir = out / f"seed_{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)

        def log(record: dict[str, Any], _f=seed_dir / "metrics.jsonl") -> None:
            with open(_f, "a") as fh:
                fh.write(json.dumps(record, default=float) + "\n")

        def ctx(name: str, options: dict[str, Any]) -> MethodContext:
            return MethodContext(data=data, seed=seed, K=cfg["K"], train=train_cfg, model=cfg["model"],
                                 balancer=cfg["balancer"], options=options, workdir=seed_dir / "checkpoints" / name,
                                 log=lambda r, n=name: log(dict(r, method=n)), cache=cache, name=name)

        echo(f"[seed {seed}] naive MTL and single-task baselines on {data.name}")
        mtl = METHODS["naive_mtl"](ctx("naive_mtl", {}))
        stl = METHODS["single_task"](ctx("single_task", {}))
        cache["single_task_model"] = stl.model
        ref = reference_flops(ctx("reference", {}))
        run: dict[str, Any] = {
            "seed": seed,
            "single_task": {"per_task": stl.per_task, "delta_mtl": 0.0, "flops": ref["single_task"],
                            "params": count_parameters(stl.model), "train_seconds": stl.train_seconds},
            "naive_mtl": {"per_task": mtl.per_task, "delta_mtl": delta_mtl(mtl.per_task, stl.per_task, primary),
                          "flops": ref["naive_mtl"], "params": count_parameters(mtl.model),
                          "train_seconds": mtl.train_seconds},
            "interrogate": {},
        }
        for lam in lambdas:
            echo(f"[seed {seed}] InterroGate lambda_s={lam:g}")
            res = interrogate(ctx(f"interrogate_lambda_{lam:g}", dict(base_options, lambda_s=lam)))
            run["interrogate"][f"{lam:g}"] = {
                "lambda_s": lam, "per_task": res.per_task, "delta_mtl": delta_mtl(res.per_task, stl.per_task, primary),
                "flops": res.extra["flops"]["compiled"], "flops_gated": res.extra["flops"]["gated"],
                "params": res.extra["params"]["compiled"], "task_specific_fraction": res.extra["task_specific_fraction"],
                "sharing_pattern": res.extra["sharing_pattern"], "train_seconds": res.train_seconds,
                "compile_max_abs_diff": res.extra["compile_max_abs_diff"]}
        runs.append(run)
        atomic_json(seed_dir / "run.json", run)
    summary = summarise_sweep(runs, lambdas)
    summary.update(config=cfg, seeds=seeds, lambdas=lambdas, out_dir=str(out))
    summary["table"] = sweep_table(summary)
    atomic_json(out / "sweep.json", summary)
    (out / "sweep.md").write_text(summary["table"] + "\n")
    plot_tradeoff(summary, out / "tradeoff.png")
    for lam in lambdas:
        plot_sharing(runs[0]["interrogate"][f"{lam:g}"]["sharing_pattern"], out / f"sharing_lambda_{lam:g}.png",
                     title=f"InterroGate sharing pattern, lambda_s={lam:g}, seed {runs[0]['seed']}")
    return summary


def interrogate_sweep_cli(config: Mapping[str, Any], lambdas: Sequence[float], seeds: Sequence[int],
                          out_dir: Path | str) -> str:
    """What ``taskgrouping interrogate-sweep`` runs: :func:`interrogate_sweep`, returning the table."""
    return interrogate_sweep(config, lambdas, seeds, out_dir, echo=lambda s: None)["table"]


def atomic_json(path: Path, obj: Any) -> None:
    from taskgrouping.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


def summarise_sweep(runs: Sequence[Mapping[str, Any]], lambdas: Sequence[float]) -> dict[str, Any]:
    """Means and standard deviations over seeds, and the two questions the sweep answers."""
    def agg(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        d_mean, d_std = _mean_std([r["delta_mtl"] for r in records])
        f_mean, f_std = _mean_std([r["flops"] for r in records])
        p_mean, _ = _mean_std([r["params"] for r in records])
        return {"delta_mtl": d_mean, "delta_mtl_std": d_std, "flops": f_mean, "flops_std": f_std, "params": p_mean,
                "n_seeds": len(records)}

    stl = agg([r["single_task"] for r in runs])
    mtl = agg([r["naive_mtl"] for r in runs])
    points = []
    for lam in lambdas:
        recs = [r["interrogate"][f"{lam:g}"] for r in runs]
        p = agg(recs)
        fr = [statistics.fmean(r["task_specific_fraction"].values()) for r in recs]
        p.update(lambda_s=lam, task_specific_fraction=statistics.fmean(fr))
        points.append(p)
    flops = [p["flops"] for p in points]
    monotone = all(b <= a for a, b in zip(flops, flops[1:]))
    winners = [p["lambda_s"] for p in points if p["delta_mtl"] >= mtl["delta_mtl"] and p["flops"] <= stl["flops"]]
    return {"single_task": stl, "naive_mtl": mtl, "interrogate": points,
            "answers": {"point_beating_naive_mtl_within_stl_flops": winners,
                        "flops_monotone_nonincreasing_in_lambda": monotone,
                        "flops_strictly_decreasing_in_lambda": all(b < a for a, b in zip(flops, flops[1:]))},
            "conventions": {"delta_mtl": "mean over tasks of (-1)^l (M - M_STL)/M_STL on each task's primary metric, "
                                         "test split, vs the same seed's STL (InterroGate Eq. 6); positive is better",
                            "flops": "torch.utils.flop_counter on one input, eval mode: InterroGate = compiled "
                                     "network incl. heads; STL = N single-task networks; naive MTL = one network"}}


def sweep_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of the sweep (mean ± std over seeds)."""
    stl_flops = summary["single_task"]["flops"]

    def row(name: str, p: Mapping[str, Any], frac: str) -> str:
        return (f"| {name} | {100 * p['delta_mtl']:+.2f} ± {100 * p['delta_mtl_std']:.2f} | "
                f"{p['flops'] / 1e6:.3f} | {p['flops'] / stl_flops:.3f} | {int(p['params']):,} | {frac} |")

    lines = ["| method | Δ_MTL vs STL (%) | MFLOPs | FLOPs / STL | params | task-specific fraction |",
             "|---|---|---|---|---|---|",
             row("single-task (STL)", summary["single_task"], "1"),
             row("naive MTL", summary["naive_mtl"], "0")]
    for p in summary["interrogate"]:
        lines.append(row(f"InterroGate λ_s={p['lambda_s']:g}", p, f"{p['task_specific_fraction']:.3f}"))
    a = summary["answers"]
    n = summary["single_task"]["n_seeds"]
    lines += ["", f"{n} seed(s); Δ_MTL on the test split against the same seed's STL, each task's primary metric.",
              f"- InterroGate points with Δ_MTL ≥ naive MTL's at ≤ STL FLOPs: "
              f"{', '.join(f'λ_s={x:g}' for x in a['point_beating_naive_mtl_within_stl_flops']) or 'none'}",
              f"- FLOPs non-increasing as λ_s grows: {'yes' if a['flops_monotone_nonincreasing_in_lambda'] else 'no'}"]
    return "\n".join(lines)


def plot_tradeoff(summary: Mapping[str, Any], path: Path) -> None:
    """Δ_MTL vs FLOPs for every λ_s, with STL and naive MTL (InterroGate Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = summary["interrogate"]
    ax.errorbar([p["flops"] / 1e6 for p in pts], [100 * p["delta_mtl"] for p in pts],
                xerr=[p["flops_std"] / 1e6 for p in pts], yerr=[100 * p["delta_mtl_std"] for p in pts],
                fmt="o-", color="tab:blue", capsize=3, label="InterroGate")
    for p in pts:
        ax.annotate(f"λ={p['lambda_s']:g}", (p["flops"] / 1e6, 100 * p["delta_mtl"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for key, label, marker, color in (("single_task", "STL", "s", "black"), ("naive_mtl", "naive MTL", "^", "tab:red")):
        p = summary[key]
        ax.errorbar([p["flops"] / 1e6], [100 * p["delta_mtl"]], yerr=[100 * p["delta_mtl_std"]], fmt=marker,
                    color=color, capsize=3, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("MFLOPs per input (compiled network)")
    ax.set_ylabel("Δ_MTL vs STL (%)")
    ax.set_title("Accuracy / compute trade-off")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sharing(pattern: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Per layer and task: fraction of task-specific channels (left) and each task's mean weight
    softmax(β) in the shared mix, i.e. how much it contributes to the shared bank (right) - Fig. 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = [r["layer"] for r in pattern]
    tasks = list(pattern[0]["task_specific_fraction"])
    spec = np.array([[r["task_specific_fraction"][t] for t in tasks] for r in pattern])
    share = np.array([[r["beta_mean"][t] for t in tasks] for r in pattern])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(4 + 0.9 * len(tasks), 1.5 + 0.35 * len(layers)),
                                 gridspec_kw={"width_ratios": [1.2, 1]})
    im = a1.imshow(spec, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    a1.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=7)
    a1.set_yticks(range(len(layers)), layers, fontsize=7)
    a1.set_title("task-specific channel fraction", fontsize=9)
    fig.colorbar(im, ax=a1, fraction=0.046)
    left = np.zeros(len(layers))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(tasks), 2)))
    for i, t in enumerate(tasks):
        a2.barh(range(len(layers)), share[:, i], left=left, color=colors[i], label=t)
        left += share[:, i]
    a2.set_yticks(range(len(layers)), layers, fontsize=7)
    a2.invert_yaxis()
    a2.set_xlim(0, 1)
    a2.set_title("mean softmax(β): contribution to the shared mix", fontsize=9)
    a2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["DEFAULT_OPTIONS", "InterroGateOptions", "parse_options", "sparsity_loss", "InterroGateObjective",
           "interrogate", "single_task_model", "build_interrogate_model", "interrogate_sweep", "interrogate_sweep_cli",
           "sweep_table", "plot_tradeoff", "plot_sharing"]
