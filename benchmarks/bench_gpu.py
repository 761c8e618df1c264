"""Training throughput on a GPU: naive MTL, DMTG and a gradient balancer, fp32 vs bf16, 1 GPU vs DDP.

Setup: CelebA-shaped data (3x64x64 inputs, N=40 binary tasks whose labels are random linear teachers
of the 8x8-pooled image, so that there is something to learn), TAG's ResNet encoder (``tag_resnet``,
``shared_blocks=1``: shared stem, branched residual block, as DMTG's shared CelebA setting), batch
256, Adam. Every row trains through the package's own path (the registered method, ``engine.fit``,
the trainer), so what is timed is what ``taskgrouping run`` does:

* ``naive_mtl``: one branch, 40 heads, equal weighting;
* ``dmtg``: K=5 branches x 40 heads, Gumbel-softmax assignment (``recipe: paper_code``: S learns from
  the first step);
* ``pcgrad``: naive MTL with PCGrad at parameter level (40 backward passes per step) and at feature
  level (``pcgrad_feature``: one pass through the heads).

Precisions: ``fp32`` (``train.amp=false``), ``bf16`` (autocast), ``bf16+cl`` (and channels-last),
``bf16+cl+compile`` (and ``torch.compile`` of the trunks). Images/s is the training split's size over
an epoch's wall time (the epoch's validation pass over 1/16 as many images included), median over
the epochs after the first (the first holds warm-up and compilation). On a machine with more than
one GPU the bf16 rows are run again under ``torchrun`` on all of them (``DDP xG``: global batch 256,
global images/s).

bf16 vs fp32: after the same steps from the same initialisation, each row's final validation loss
(total over the tasks) and mean validation error must agree within ``--tolerance`` (relative; default
0.05); the table says whether they do.

Writes benchmarks/results/gpu.json and gpu.md.

    python benchmarks/bench_gpu.py [--epochs 4] [--n-train 8192] [--rows naive_mtl,dmtg,pcgrad]
        [--precisions fp32,bf16,bf16+cl,bf16+cl+compile] [--tolerance 0.05]
    python benchmarks/bench_gpu.py --smoke   # a tiny run on the CPU, to check the script (writes nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

N_TASKS = 40
K = 5
BATCH = 256
ROWS = {
    "naive_mtl": ("naive_mtl", {"name": "ew"}),
    "dmtg": ("dmtg", {"name": "ew"}),
    "pcgrad": ("naive_mtl", {"name": "pcgrad"}),
    "pcgrad_feature": ("naive_mtl", {"name": "pcgrad", "options": {"feature_level": True}}),
}
PRECISIONS = {
    "fp32": {"amp": False},
    "bf16": {"amp": True},
    "bf16+cl": {"amp": True, "channels_last": True},
    "bf16+cl+compile": {"amp": True, "channels_last": True, "compile": True},
}
RESULTS = Path(__file__).resolve().parent / "results"


def celeba_shaped(n_train: int, n_tasks: int, side: int, seed: int = 0):
    """Random 3 x side x side images; task t's label is the sign of a random linear teacher of the
    image pooled to 8 x 8 (balanced by its median)."""
    from taskgrouping.data.base import TaskData, TensorTaskDataset
    from taskgrouping.tasks import Task

    g = torch.Generator().manual_seed(seed)
    n_val = max(n_train // 16, 2)
    x = torch.randn(n_train + 2 * n_val, 3, side, side, generator=g)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
    scores = pooled @ torch.randn(pooled.shape[1], n_tasks, generator=g)
    labels = (scores > scores.median(dim=0).values).long()
    tasks = [Task(f"attr{t}", "binary") for t in range(n_tasks)]

    def split(lo: int, hi: int) -> TensorTaskDataset:
        return TensorTaskDataset(x[lo:hi], {t.name: labels[lo:hi, i] for i, t in enumerate(tasks)})
    return TaskData("celeba_shaped", tasks, split(0, n_train), split(n_train, n_train + n_val),
                    split(n_train + n_val, n_train + 2 * n_val), (3, side, side))


def run_row(row: str, precision: str, data, epochs: int, batch: int, k: int, device: str) -> dict[str, Any]:
    """Train one row at one precision; images/s per epoch and the final validation numbers."""
    from taskgrouping.engine.trainer import TrainConfig
    from taskgrouping.methods.base import MethodContext, available_methods

    method, balancer = ROWS[row]
    records: list[dict[str, Any]] = []
    train = TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, select="last", device=device, progress=False,
                        **PRECISIONS[precision])
    options = {"recipe": "paper_code"} if method == "dmtg" else {}
    ctx = MethodContext(data=data, seed=0, K=k, train=train, model={"backbone": "tag_resnet", "shared_blocks": 1},
                        balancer=balancer, options=options, name=method, log=records.append)
    available_methods()[method](ctx)
    epochs_seen = [r for r in records if r.get("network") in (method, "dmtg", "naive_mtl") and "seconds" in r]
    speeds = [len(data.train) / r["seconds"] for r in epochs_seen[1:]] or [len(data.train) / epochs_seen[0]["seconds"]]
    last = epochs_seen[-1]
    errors = [m["error"] for m in last["val"].values()]
    return {"images_per_s": statistics.median(speeds), "epochs_timed": len(speeds),
            "val_total_loss": last["val_total_loss"], "val_mean_error": sum(errors) / len(errors)}


def measure(rows: list[str], precisions: list[str], epochs: int, n_train: int, side: int, n_tasks: int, k: int,
            batch: int, device: str) -> dict[str, dict[str, Any]]:
    from taskgrouping.engine.distributed import Ranks

    data = celeba_shaped(n_train, n_tasks, side)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        for precision in precisions:
            out[f"{row}/{precision}"] = run_row(row, precision, data, epochs, batch, k, device)
            if Ranks.current().is_main:
                print(f"{row:15s} {precision:16s} {out[f'{row}/{precision}']['images_per_s']:10.0f} images/s",
                      file=sys.stderr, flush=True)
    return out


def ddp(args: argparse.Namespace, rows: list[str], precisions: list[str], gpus: int) -> dict[str, dict[str, Any]]:
    """The bf16 rows again under torchrun on every GPU (global batch, global images/s)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               str(Path(__file__).resolve()), "--ddp-child", str(target), "--epochs", str(args.epochs),
               "--n-train", str(args.n_train), "--rows", ",".join(rows), "--precisions", ",".join(precisions)]
        subprocess.run(cmd, check=True)
        return json.loads(target.read_text())


def table(single: dict[str, dict[str, Any]], multi: dict[str, dict[str, Any]] | None, gpus: int,
          tolerance: float, rows: list[str], precisions: list[str]) -> tuple[str, dict[str, Any]]:
    head = ["row", "precision", "images/s (1 GPU)"] + ([f"images/s (DDP x{gpus})"] if multi else []) + \
           ["val total loss", "val mean error", "vs fp32: loss / error (rel.)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    agreement: dict[str, Any] = {}
    for row in rows:
        ref = single.get(f"{row}/fp32")
        for precision in precisions:
            r = single[f"{row}/{precision}"]
            cells = [row, precision, f"{r['images_per_s']:.0f}"]
            if multi:
                m = multi.get(f"{row}/{precision}")
                cells.append(f"{m['images_per_s']:.0f}" if m else "–")
            cells += [f"{r['val_total_loss']:.4f}", f"{r['val_mean_error']:.4f}"]
            if ref is None or precision == "fp32":
                cells.append("–")
            else:
                dl = abs(r["val_total_loss"] - ref["val_total_loss"]) / ref["val_total_loss"]
                de = abs(r["val_mean_error"] - ref["val_mean_error"]) / max(ref["val_mean_error"], 1e-12)
                ok = dl <= tolerance and de <= tolerance
                agreement[f"{row}/{precision}"] = {"loss": dl, "error": de, "within_tolerance": ok}
                cells.append(f"{dl:.3f} / {de:.3f} ({'agree' if ok else 'DIFFER'})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=8192)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--smoke", action="store_true", help="a tiny run on the CPU that writes nothing")
    parser.add_argument("--ddp-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [r for r in rows if r not in ROWS] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        sys.exit(f"error: unknown rows or precisions {unknown}; expected rows {list(ROWS)}, precisions "
                 f"{list(PRECISIONS)}")
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    if args.smoke:  # also under torchrun (gloo): the DDP path on CPU
        from taskgrouping.engine.distributed import setup

        ranks = setup("cpu")
        found = measure(rows, ["fp32"], 2, 64, 16, 4, 2, 16, "cpu")
        if ranks.is_main:
            print(json.dumps(found, indent=1))
        return
    if not torch.cuda.is_available():
        sys.exit("error: bench_gpu.py measures GPU throughput and needs a CUDA device; torch sees none here "
                 "(run it on a GPU machine, or --smoke for a CPU check of the script)")
    if args.ddp_child is not None:  # one rank of the DDP run
        from taskgrouping.engine.distributed import setup

        ranks = setup("cuda")
        found = measure(rows, precisions, args.epochs, args.n_train, 64, N_TASKS, K, BATCH, "cuda")
        if ranks.is_main:
            args.ddp_child.write_text(json.dumps(found))
        return
    single = measure(rows, precisions, args.epochs, args.n_train, 64, N_TASKS, K, BATCH, "cuda")
    gpus = torch.cuda.device_count()
    multi = None
    if gpus > 1:
        bf16 = [p for p in precisions if p != "fp32"]
        multi = ddp(args, rows, bf16, gpus)
    text, agreement = table(single, multi, gpus, args.tolerance, rows, precisions)
    machine = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
               "cuda": torch.version.cuda, "python": platform.python_version()}
    from taskgrouping.engine.driver import git_revision
    from taskgrouping.io import atomic_write_json, atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    command = " ".join(["python", "benchmarks/bench_gpu.py", *sys.argv[1:]])
    atomic_write_json(RESULTS / "gpu.json", {"machine": machine, "single": single, "ddp": multi,
                                             "bf16_vs_fp32": agreement, "tolerance": args.tolerance,
                                             "epochs": args.epochs, "n_train": args.n_train, "command": command,
                                             "git_revision": git_revision()})
    note = "" if multi else "\nOne GPU here: no DDP column (it needs `torch.cuda.device_count() > 1`).\n"
    atomic_write_text(RESULTS / "gpu.md",
        f"# GPU throughput ({machine['gpu']} x{gpus}, torch {machine['torch']}, CUDA {machine['cuda']})\n\n"
        f"CelebA-shaped 3x64x64, N={N_TASKS} binary tasks, TAG ResNet (shared stem), batch {BATCH}, Adam; "
        f"{args.n_train} training images, {args.epochs} epochs, median images/s over the epochs after the first. "
        f"bf16 vs fp32: final validation loss / mean error relative to fp32, tolerance {args.tolerance}.\n\n"
        f"{text}\n{note}\nWritten by `{command}` at {git_revision()}.\n")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
