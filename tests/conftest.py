"""Shared test settings: one CPU thread (CI has 2 shared cores) and the shared-data location."""

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
