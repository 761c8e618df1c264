"""What every command that trains does around its trainings (``run``, the balancer study, the
InterroGate sweep): set the threads, check the output directory before anything is written, write
the resolved config, log epoch records as JSON lines, build method contexts, and record provenance
(versions, git revision, times) with the results.
"""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from taskgrouping import __version__
from taskgrouping.config import ConfigError, dump
from taskgrouping.data.base import TaskData
from taskgrouping.data.registry import load_dataset
from taskgrouping.engine.trainer import TrainConfig
from taskgrouping.io import atomic_write_text

__all__ = ["Driver", "prepare_data", "versions", "git_revision"]

#: built-in generators whose draw follows the run seed unless ``data.seed`` is given
SEEDED_DATA = ("planted", "multimnist", "digits")


def versions() -> dict[str, str]:
    import numpy
    import scipy

    return {"taskgrouping": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "platform": platform.platform()}


def git_revision() -> str:
    """HEAD of the checkout the package is imported from (``+dirty`` if modified), else ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare_data(config: Mapping[str, Any]) -> TaskData:
    """Load the configured dataset and check K against its tasks."""
    options = {k: v for k, v in config["data"].items() if k != "name"}
    if "seed" not in options and config["data"]["name"] in SEEDED_DATA:
        options["seed"] = config["seed"]
    data = load_dataset(config["data"]["name"], **options)
    n = len(data.tasks)
    if config["K"] > n:
        raise ConfigError(f"K={config['K']} is larger than the number of tasks ({n}) of dataset {data.name!r}")
    return data


class Driver:
    """One command's output directory and the run-wide settings of a validated ``config``.

    Args:
        config: the resolved, validated config.
        out_dir: the output directory.
        resume: continue a directory written by the same config (only commands that can resume pass it).
    """

    def __init__(self, config: Mapping[str, Any], out_dir: Path | str, resume: bool = False) -> None:
        self.config = dict(config)
        self.out = Path(out_dir)
        self.resume = resume
        self.train = TrainConfig(**self.config["train"])
        self.started = datetime.now(timezone.utc).isoformat()
        if self.config.get("threads"):
            torch.set_num_threads(int(self.config["threads"]))

    def check_out_dir(self, can_resume: bool = False) -> None:
        """Refuse a non-empty directory unless resuming the same config (before anything is written)."""
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            old = self.out / "config.yaml"
            if not (can_resume and self.resume):
                hint = "pass --resume to continue it or choose another --out" if can_resume else "choose another --out"
                raise ConfigError(f"output directory {str(self.out)!r} is not empty; {hint}")
            if old.is_file() and old.read_text() != dump(self.config):
                raise ConfigError(f"--resume: the config differs from {old}; resume with the same config")

    def open(self, write_config: bool = True) -> None:
        """Create the directory (and write ``config.yaml``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if write_config:
            atomic_write_text(self.out / "config.yaml", dump(self.config))

    @staticmethod
    def logger(path: Path, **fields: Any) -> Callable[[dict[str, Any]], None]:
        """A log function appending each record, plus ``fields``, as one JSON line to ``path``."""
        def write(record: dict[str, Any]) -> None:
            with open(path, "a") as fh:
                fh.write(json.dumps(dict(record, **fields), default=float) + "\n")
        return write

    def context(self, data: TaskData, name: str, *, seed: int | None = None,
                options: Mapping[str, Any] | None = None, balancer: Mapping[str, Any] | None = None,
                workdir: Path | None = None, log: Callable[[dict[str, Any]], None] | None = None,
                cache: dict[str, Any] | None = None, figures_dir: Path | None = None,
                diagnostics: bool = False) -> Any:
        """A :class:`~taskgrouping.methods.base.MethodContext` for method ``name`` on ``data``
        (the config's seed, K, model, balancer and training settings unless given)."""
        from taskgrouping.methods.base import MethodContext

        cfg = self.config
        return MethodContext(
            data=data, seed=cfg["seed"] if seed is None else seed, K=cfg["K"], train=self.train, model=cfg["model"],
            balancer=dict(cfg["balancer"] if balancer is None else balancer),
            options=dict(cfg.get(name) or {}) if options is None else dict(options), workdir=workdir,
            resume=self.resume, log=log or (lambda record: None), cache={} if cache is None else cache, name=name,
            diagnostics=dict(cfg.get("diagnostics") or {}) if diagnostics else {}, figures_dir=figures_dir)

    def provenance(self) -> dict[str, Any]:
        """Times, versions and git revision recorded with every result."""
        return {"started": self.started, "finished": datetime.now(timezone.utc).isoformat(), "versions": versions(),
                "git_revision": git_revision(), "out_dir": str(self.out)}
