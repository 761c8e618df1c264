"""Every method, end to end, on one device: does each run finish (a smoke check for CUDA paths, which CI never runs).

Each method of the catalogue runs once through ``run_experiment`` (what ``taskgrouping run`` does) on tiny
data for one or two epochs, on each backbone case: ``mlp`` (planted regression tasks, 4 tasks in 2 groups),
``cnn`` (MultiMNIST's 8 binary tasks, small_cnn), ``bn`` (the same with resnet20: batch norm, which under
bf16 autocast and stacked branches once failed on CUDA) and ``vit`` (attention, which under vmap once failed
in backward on CUDA); ``train.amp`` and ``train.branches`` are the defaults (bf16 autocast and stacked
branches on CUDA). A run passes when it writes results.json with finite test losses; a failure is recorded
with its error's last line. The numbers themselves are not the point (a few dozen steps).

Writes benchmarks/results/device_smoke_<device>.json and .md after every run (a run cut short keeps what it
did); exits 1 if any run failed.

    python benchmarks/device_smoke.py [--device cuda] [--cases mlp,cnn,bn,vit] [--methods naive_mtl,dmtg,...]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from taskgrouping.config import build_config
from taskgrouping.engine.driver import git_revision
from taskgrouping.experiment import run_experiment
from taskgrouping.io import atomic_write_json, atomic_write_text
from taskgrouping.methods.base import available_methods

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
_MNIST = ["data.n_train=256", "data.n_val=128", "data.n_test=128", "train.batch_size=64"]
#: backbone case -> (preset, overrides)
CASES = {
    "mlp": ("planted", ["data.n_tasks=4", "data.group_sizes=[2,2]", "data.n_train=256", "data.n_val=128",
                        "data.n_test=128", "K=2", "train.batch_size=64"]),
    "cnn": ("multimnist", _MNIST),
    "bn": ("multimnist", _MNIST + ["model.backbone=resnet20", "model.options={}"]),
    "vit": ("multimnist", _MNIST + ["model.backbone=vit", "model.options={dim: 32, depth: 2, heads: 2, patch_size: 7}"]),
}
#: per-method settings that keep a run small (the two-shot methods train many networks)
METHOD_OVERRIDES = {"esa": ["esa.max_tasks=4"], "optimal": ["optimal.max_tasks=4"], "interrogate": ["interrogate.epochs=1"],
                    "mtg_net": ["mtg_net.rounds=2", "mtg_net.meta_epochs=2"]}
#: methods that train a network per task subset: run on the 4-task case only
MANY_NETWORKS = ("esa", "hoa", "optimal", "mtg_net")


def runs(cases: list[str], methods: list[str]) -> list[tuple[str, str]]:
    return [(case, m) for case in cases for m in methods if case == "mlp" or m not in MANY_NETWORKS]


def run_one(case: str, method: str, device: str, epochs: int) -> dict:
    preset, overrides = CASES[case]
    extra = [f"methods=[{method}]", f"train.epochs={epochs}", f"train.device={device}", "train.progress=false",
             "train.early_stopping=0"] + METHOD_OVERRIDES.get(method, [])
    if method == "fixed":
        extra.append("fixed.groups=" + ("[[g0_t0,g0_t1],[g1_t0,g1_t1]]" if case == "mlp" else
                                        "[[left_even,left_gt4,left_loop,left_prime],"
                                        "[right_even,right_gt4,right_loop,right_prime]]"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = build_config(preset=preset, overrides=overrides + extra)
            run_experiment(cfg, Path(tmp) / "run", echo=lambda _: None)
            rec = json.loads((Path(tmp) / "run" / "results.json").read_text())["methods"][method]
            loss = rec["total_test_loss"]
            ok = loss is not None and math.isfinite(loss)
            error = None if ok else f"total test loss {loss}"
        except Exception as exc:  # noqa: BLE001  (every failure is the finding, recorded with its line)
            ok, loss = False, None
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            where = traceback.extract_tb(exc.__traceback__)[-1]
            error += f" ({Path(where.filename).name}:{where.lineno})"
    return {"case": case, "method": method, "ok": ok, "total_test_loss": loss, "error": error,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--methods", default=",".join(sorted(available_methods())))
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases, methods = args.cases.split(","), args.methods.split(",")
    unknown = [c for c in cases if c not in CASES] + [m for m in methods if m not in available_methods()]
    if unknown:
        sys.exit(f"error: unknown case or method {unknown}; cases {list(CASES)}, methods {sorted(available_methods())}")
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU"
    planned = runs(cases, methods)
    rows: list[dict] = []
    failed = write(name, args, rows, len(planned))
    for case, method in planned:
        row = run_one(case, method, args.device, args.epochs)
        print(f"{case:4} {method:15} {'ok' if row['ok'] else 'FAILED'} {row['seconds']:6.1f} s"
              + (f"  {row['error']}" if row["error"] else ""), flush=True)
        rows.append(row)
        failed = write(name, args, rows, len(planned))  # after every run: a run cut short keeps what it did
    sys.exit(1 if failed else 0)


def write(name: str, args: argparse.Namespace, rows: list[dict], planned: int) -> int:
    """device_smoke_<device>.json / .md for the runs so far; returns how many failed."""
    result = {"device": args.device, "device_name": name, "torch": torch.__version__, "epochs": args.epochs,
              "git_revision": git_revision(), "runs": rows, "planned": planned,
              "failed": sum(not r["ok"] for r in rows)}
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUT / f"device_smoke_{args.device}.json", result, strict=True)
    lines = [f"# Every method end to end on {name} ({args.device}, torch {torch.__version__})", "",
             f"{args.epochs} epochs on tiny data, default amp and branches; {len(rows)} of {planned} runs done, "
             f"{result['failed']} failed.", "", "| case | method | result | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['method']} | {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])} | {r['seconds']} |"
              for r in rows]
    atomic_write_text(OUT / f"device_smoke_{args.device}.md", "\n".join(lines) + "\n")
    return result["failed"]


if __name__ == "__main__":
    main()
