"""Back end of ``taskgrouping tag-select``: TAG's group selection from an affinity file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskgrouping.methods.tag.affinity_table import load_affinity
from taskgrouping.methods.tag.selection import select_groups

__all__ = ["tag_select_cli"]


def tag_select_cli(affinity_path: str | Path, groups: int) -> dict[str, Any]:
    """Back end of ``taskgrouping tag-select --affinity FILE.json --groups K``.

    Returns ``{"groups": [[task, ...], ...], "serves": {task: group_index}}`` (tasks named as in the
    file).
    """
    names, mat = load_affinity(affinity_path)
    g = select_groups(mat, names, groups)
    return {"groups": g.as_lists(), "serves": dict(g.serves)}
