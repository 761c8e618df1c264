"""Exact resume after SIGKILL: a training killed at random moments and resumed until it finishes ends
with the same numbers as an uninterrupted run.

Setting: a small MLP (widths 32, 16) on the built-in ``planted`` data (4 regression tasks in 2 groups,
256 training samples, batch 32, Adam, step schedule), ``--epochs`` epochs, a checkpoint after each,
one torch thread, seed 5. The training runs in a child process (this file with ``--child``) that
prints one line per epoch just before that epoch's checkpoint is committed. For each kill the parent
draws an epoch ``k`` and a fraction ``u``, waits for the line of epoch ``k`` (or the first later one)
and sends SIGKILL ``u x 1.5`` epoch-times later, i.e. during that epoch's commit or the next epoch's
training. The child is then started again (``resume=True``) and so on; after ``--kills`` kills it
runs to the end. A trial is *identical* when the final weights are bit for bit those of the
uninterrupted run and the history equals it except for the timings.

Writes benchmarks/results/resume.json and benchmarks/results/resume.md.
Run: python benchmarks/bench_resume.py [--trials 10] [--kills 3] [--epochs 30] [--seed N]
The test ``tests/engine/test_checkpoint_kill.py`` uses the same harness with forked children.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO

OUT = Path(__file__).resolve().parent / "results"
SEED = 5


def train_child(ckpt_dir: str, out_file: str, epochs: int, emit: Callable[[str], None]) -> None:
    """Train (resuming from ``ckpt_dir``), emitting ``epoch E SECONDS`` per epoch before its checkpoint
    is committed; then write the final weights to ``out_file`` and the history to ``out_file.json``."""
    import torch

    from taskgrouping.data.base import make_loader
    from taskgrouping.data.builtin import planted
    from taskgrouping.engine.trainer import TrainConfig, train
    from taskgrouping.io import atomic_write_json, save_state_dict
    from taskgrouping.models.branched import build_branched_model

    torch.set_num_threads(1)
    data = planted(n_tasks=4, group_sizes=[2, 2], input_dim=8, feature_dim=3, n_train=256, n_val=64, n_test=64)
    torch.manual_seed(0)
    model = build_branched_model(data.tasks, [data.task_names[:2], data.task_names[2:]], data.input_shape,
                                 backbone="mlp", backbone_options={"widths": [32, 16]})
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, progress=False, schedule="step", step_size=3)
    res = train(model, make_loader(data.train, 32, True), make_loader(data.val, 32, False), data.tasks, cfg,
                seed=SEED, checkpoint_dir=ckpt_dir, resume=True,
                log=lambda rec: emit(f"epoch {rec['epoch']} {rec['seconds']:.6f}\n"))
    save_state_dict(out_file, res.model.state_dict())
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
    atomic_write_json(out_file + ".json", {"history": history, "best_epoch": res.best_epoch})
    emit("done\n")


class Child:
    """A running training: its pid and the pipe it writes its epoch lines to."""

    def __init__(self, pid: int, lines: IO[str], popen: subprocess.Popen | None = None) -> None:
        self.pid, self.lines, self.popen = pid, lines, popen

    def wait(self) -> int:
        """Exit status (negative: killed by that signal)."""
        self.lines.close()
        if self.popen is not None:
            return self.popen.wait()
        status = os.waitpid(self.pid, 0)[1]
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def start_subprocess(ckpt_dir: str, out_file: str, epochs: int) -> Child:
    """The child as a fresh interpreter running this file with ``--child``."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", ckpt_dir, out_file, str(epochs)],
                            stdout=subprocess.PIPE, text=True)
    return Child(proc.pid, proc.stdout, proc)


def start_fork(ckpt_dir: str, out_file: str, epochs: int) -> Child:
    """The child as a fork of this process (no interpreter start-up; POSIX only)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: train, then leave without running the parent's cleanup
        os.close(r)
        code = 1
        try:
            train_child(ckpt_dir, out_file, epochs, lambda s: os.write(w, s.encode()))
            code = 0
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            os._exit(code)
    os.close(w)
    return Child(pid, os.fdopen(r))


def checkpoint_snapshot(ckpt_dir: Path) -> dict:
    """What a kill left: the committed epoch and whether a save was under way (an uncommitted folder)."""
    state = ckpt_dir / "state.json"
    committed = json.loads(state.read_text())["epoch"] if state.is_file() else None
    folders = sorted(p.name for p in ckpt_dir.glob("epoch_*"))
    return {"committed_epoch": committed, "folders": folders,
            "mid_save": len(folders) > 1 or (ckpt_dir / "state.json.tmp").exists()
            or (committed is None and bool(folders))}


def run_with_kills(start: Callable[[str, str, int], Child], ckpt_dir: Path, out_file: Path, epochs: int,
                   kills: int, rng: random.Random) -> list[dict]:
    """Train to the end, SIGKILLing the child ``kills`` times at moments drawn from ``rng``; returns one
    snapshot per kill that landed (a kill drawn after the child finished does not count)."""
    landed: list[dict] = []
    for attempt in range(kills + 1):
        child = start(str(ckpt_dir), str(out_file), epochs)
        if attempt < kills:
            target, frac = rng.randrange(epochs - 1), rng.random()
            for line in child.lines:
                parts = line.split()
                if parts[0] == "epoch" and int(parts[1]) >= target:
                    time.sleep(frac * 1.5 * float(parts[2]))
                    os.kill(child.pid, signal.SIGKILL)
                    break
        else:
            for _ in child.lines:
                pass
        rc = child.wait()
        if rc == -signal.SIGKILL:
            landed.append(checkpoint_snapshot(ckpt_dir))
            continue
        if rc != 0:
            raise RuntimeError(f"training child exited with status {rc}")
        return landed
    raise AssertionError("unreachable: the last start runs to the end")


def read_result(out_file: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(str(out_file)), json.loads(Path(str(out_file) + ".json").read_text())


def identical(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    """Same weights bit for bit and the same history (timings excluded)."""
    import torch

    wa, wb = a[0], b[0]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and a[1] == b[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: random)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
        root = Path(tmp)
        ref_child = start_subprocess(str(root / "ref_ckpt"), str(root / "ref.safetensors"), args.epochs)
        for _ in ref_child.lines:
            pass
        if ref_child.wait() != 0:
            raise SystemExit("the uninterrupted reference run failed")
        ref = read_result(root / "ref.safetensors")
        trials = []
        for i in range(args.trials):
            out = root / f"trial{i}.safetensors"
            kills = run_with_kills(start_subprocess, root / f"trial{i}_ckpt", out, args.epochs, args.kills, rng)
            trials.append({"trial": i, "kills": kills, "identical": identical(read_result(out), ref)})
            print(f"trial {i}: {len(kills)} kills landed ({sum(k['mid_save'] for k in kills)} during a save), "
                  f"identical={trials[-1]['identical']}", flush=True)
    n_same = sum(t["identical"] for t in trials)
    n_kills = sum(len(t["kills"]) for t in trials)
    n_mid = sum(k["mid_save"] for t in trials for k in t["kills"])
    result = {"benchmark": "SIGKILL at random moments, resumed until finished, vs an uninterrupted run",
              "setup": {"data": "planted(n_tasks=4, group_sizes=[2, 2], n_train=256)", "model": "mlp [32, 16]",
                        "epochs": args.epochs, "kills_per_trial": args.kills, "moment_seed": seed, "threads": 1},
              "machine": {"python": platform.python_version(), "processor": platform.machine(),
                          "cpus": os.cpu_count()},
              "identical": n_same, "trials": len(trials), "kills_landed": n_kills, "kills_during_a_save": n_mid,
              "results": trials}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resume.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Exact resume after SIGKILL", "",
             (f"{len(trials)} trials; each: a {args.epochs}-epoch training (MLP 32-16, planted data, 4 tasks, one "
              f"thread) SIGKILLed {args.kills} times at random moments (seed {seed}), resumed until it finished, "
              "and compared with an uninterrupted run (weights bit for bit, history without timings)."), "",
             (f"**{n_same} of {len(trials)} trials resumed to identical numbers** ({n_kills} kills landed, "
              f"{n_mid} of them inside a checkpoint save: they left a second epoch folder or a temporary "
              "state file behind)."), "",
             "| trial | kills landed | during a save | committed epoch at each kill | identical |",
             "|---:|---:|---:|---|:---:|"]
    for t in trials:
        epochs = ", ".join("none" if k["committed_epoch"] is None else str(k["committed_epoch"]) for k in t["kills"])
        lines.append(f"| {t['trial']} | {len(t['kills'])} | {sum(k['mid_save'] for k in t['kills'])} | {epochs} | "
                     f"{'yes' if t['identical'] else 'NO'} |")
    (args.out / "resume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        train_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    else:
        main()
