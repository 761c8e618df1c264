"""Shared test settings: one CPU thread (CI has 2 shared cores), the shared-data location and a helper
that runs a preset's methods in-process."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
GROUPING_DATA = SHARED / "grouping-data"


@pytest.fixture(scope="session")
def grouping_data() -> Path:
    if not GROUPING_DATA.is_dir():
        raise FileNotFoundError(f"{GROUPING_DATA} not found: the tests read the authors' measured data from "
                                "../shared/grouping-data beside the repository")
    return GROUPING_DATA


def run_preset(preset: str, methods: tuple[str, ...], seed: int = 0, options: dict | None = None):
    """(data, {method: MethodResult}) for ``methods`` run in-process on ``preset`` at ``seed`` (each with the
    preset's options for it, or ``options[method]``)."""
    from taskgrouping.config import build_config
    from taskgrouping.engine.driver import prepare_data
    from taskgrouping.methods.base import MethodContext, available_methods
    from taskgrouping.engine.trainer import TrainConfig

    cfg = build_config(preset=preset, overrides=[f"seed={seed}", "train.progress=false"])
    data = prepare_data(cfg)
    registry = available_methods()
    out = {}
    for name in methods:
        opts = (options or {}).get(name, cfg.get(name) or {})
        ctx = MethodContext(data=data, seed=seed, K=cfg["K"], train=TrainConfig(**cfg["train"]), model=cfg["model"],
                            balancer=cfg["balancer"], options=opts, name=name)
        out[name] = registry[name](ctx)
    return data, out


def npz_arrays(sizes=(40, 10, 10), dim=5, types=("binary", "regression"), seed=0, **overrides) -> dict:
    """The arrays of a small ``.npz`` dataset in the loader's format (random inputs, 0/1 labels), with
    any array replaced by ``overrides``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {"task_names": np.array([chr(ord("a") + i) for i in range(len(types))]), "task_types": np.array(types)}
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"x_{split}"] = rng.normal(size=(n, dim))
        arrays[f"y_{split}"] = rng.integers(0, 2, size=(n, len(types))).astype(float)
    arrays.update(overrides)
    return arrays


def write_npz(path: Path, **kw) -> Path:
    """Write :func:`npz_arrays` (same keywords) to ``path``."""
    import numpy as np

    np.savez(path, **npz_arrays(**kw))
    return path
