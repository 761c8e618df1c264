"""Readers (and a writer) for the per-network, per-task loss tables of Standley et al.'s network selection.

Two formats:

**Standley results format** (the ``network_selection/results*.txt`` files of Standley et al., ICML
2020): tab separated, one column per task, no header. An empty field means the network has no head
for that task. Line 1 holds the *half-sized single-task networks* (cost 0.5), one per non-empty
field; every later line is one *full-sized network* (cost 1) with the tasks of its non-empty fields.
The file does not name its tasks; they are called ``task0``, ``task1``, ... unless names are given.

**Plain CSV format** (``.csv``; comma separated, header required)::

    tasks,cost,seg,depth,normal
    seg,0.5,0.0802,,
    seg|depth,1,0.0804,0.1695,
    seg|depth|normal,1,0.0810,0.1702,0.0859

* ``tasks``: the network's tasks joined by ``|``; when every task column name is one character, the
  letters may also be written together (``sd``). Left empty, the tasks are those with a loss.
* ``cost``: the network's cost (a number >= 0).
* one column per task: the network's loss on that task, empty when the network has no head for it.
  The ``tasks`` field must name exactly the columns that hold a loss.

A network is identified by its task set and cost; a table may list each such pair only once.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from taskgrouping.io import atomic_write_text
from taskgrouping.methods.standley.networks import Network
from taskgrouping.readers import read_text

__all__ = ["MAX_TASKS", "LossTable", "read_standley_results", "read_networks_csv", "write_networks_csv",
           "read_networks"]

#: Most task columns a loss table may have (the selection's work grows with networks x tasks).
MAX_TASKS = 256

_STANDLEY = "a Standley results file (tab-separated losses, one column per task, no header)"
_CSV = "a CSV loss table with a header 'tasks,cost,<task>,...'"


class LossTable(NamedTuple):
    """Tasks (in column order) and the networks of one loss file (in file order)."""

    tasks: tuple[str, ...]
    networks: tuple[Network, ...]


def _number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {text!r}")
    return v


def _check_unique(nets: list[tuple[int, Network]], path: Path) -> None:
    first: dict[tuple[frozenset[str], float], int] = {}
    for line, n in nets:
        if n.key in first:
            raise ValueError(f"{path}, line {line}: network {n.label} is listed again (first on line {first[n.key]})")
        first[n.key] = line


def read_standley_results(path: str | Path, tasks: Sequence[str] | None = None, *, half_cost: float = 0.5,
                          full_cost: float = 1.0) -> LossTable:
    """Read a Standley results file (see the module docstring).

    Args:
        path: the file.
        tasks: names of the columns; default ``task0``, ``task1``, ...
        half_cost, full_cost: costs of the line-1 networks and of all later networks.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, a binary or oversized file, a line with another number of fields than
            tasks, a field that is not a finite number, a line without any loss, or a network listed
            twice (the message names file and line).
    """
    path = Path(path)
    lines = read_text(path, _STANDLEY).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: the file holds no networks; expected {_STANDLEY}")
    width = len(lines[0].split("\t"))
    if width > MAX_TASKS:
        raise ValueError(f"{path}, line 1: {width} tab-separated fields; at most {MAX_TASKS} tasks are supported")
    if tasks is None:
        tasks = tuple(f"task{i}" for i in range(width))
    else:
        tasks = tuple(tasks)
        if len(tasks) != width:
            raise ValueError(f"{path}, line 1: {width} tab-separated fields, but {len(tasks)} task names were "
                             f"given ({list(tasks)})")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be distinct, got {list(tasks)}")
    nets: list[tuple[int, Network]] = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if len(fields) != width:
            raise ValueError(f"{path}, line {lineno}: expected {width} tab-separated fields (one per task), "
                             f"found {len(fields)}")
        losses = {t: _number(f.strip(), f"{path}, line {lineno}, column {k + 1} ({t})")
                  for k, (t, f) in enumerate(zip(tasks, fields)) if f.strip()}
        if not losses:
            raise ValueError(f"{path}, line {lineno}: no loss on this line; every line must describe a network")
        if lineno == 1:
            nets.extend((1, Network((t,), half_cost, {t: v})) for t, v in losses.items())
        else:
            nets.append((lineno, Network(tuple(losses), full_cost, losses)))
    _check_unique(nets, path)
    return LossTable(tasks, tuple(n for _, n in nets))


def _parse_tasks_field(field: str, columns: tuple[str, ...], where: str) -> tuple[str, ...] | None:
    field = field.strip()
    if not field:
        return None
    if "|" in field:
        names = tuple(s.strip() for s in field.split("|"))
    elif field in columns:
        names = (field,)
    elif all(len(c) == 1 for c in columns):
        names = tuple(field)
    else:
        names = (field,)
    for name in names:
        if name not in columns:
            raise ValueError(f"{where}: unknown task {name!r} in the tasks field {field!r}; expected task columns "
                             f"{list(columns)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: the tasks field {field!r} names a task twice")
    return names


def read_networks_csv(path: str | Path) -> LossTable:
    """Read the plain CSV format (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a directory, a binary or oversized file, malformed CSV, a header not starting with
            ``tasks,cost`` or with repeated task columns, a row with the wrong number of columns, a
            value that is not a finite number, an unknown task name, a tasks field that disagrees with
            the filled loss columns, or a network listed twice. The message names the file and line.
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path, _CSV), newline=""))
    try:
        return _parse_csv(reader, path)
    except csv.Error as exc:
        raise ValueError(f"{path}, line {reader.line_num}: malformed CSV ({exc}); expected {_CSV}") from None


def _parse_csv(reader: Any, path: Path) -> LossTable:
    """Parse the rows of the plain CSV format (see :func:`read_networks_csv`)."""
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file; expected a header 'tasks,cost,<task>,...'")
    header = [h.strip() for h in header]
    if header[:2] != ["tasks", "cost"] or len(header) < 3:
        raise ValueError(f"{path}, line 1: header must be 'tasks,cost,<task>,...' (one column per task), "
                         f"got {','.join(header)!r}")
    columns = tuple(header[2:])
    if len(columns) > MAX_TASKS:
        raise ValueError(f"{path}, line 1: {len(columns)} task columns; at most {MAX_TASKS} are supported")
    if any(not c for c in columns) or len(set(columns)) != len(columns):
        raise ValueError(f"{path}, line 1: task column names must be non-empty and distinct, got {list(columns)}")
    nets: list[tuple[int, Network]] = []
    for row in reader:
        lineno = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}, line {lineno}: expected {len(header)} comma-separated columns "
                             f"(tasks, cost, {len(columns)} tasks), found {len(row)}")
        where = f"{path}, line {lineno}"
        cost = _number(row[1].strip(), f"{where}, column 'cost'")
        if cost < 0:
            raise ValueError(f"{where}, column 'cost': cost must be >= 0, got {row[1].strip()!r}")
        losses = {c: _number(v.strip(), f"{where}, column {c!r}") for c, v in zip(columns, row[2:]) if v.strip()}
        named = _parse_tasks_field(row[0], columns, where)
        if named is None:
            named = tuple(losses)
        elif set(named) != set(losses):
            raise ValueError(f"{where}: the tasks field names {list(named)} but losses are given for "
                             f"{list(losses)}; they must agree")
        if not named:
            raise ValueError(f"{where}: the network has no task (no loss and an empty tasks field)")
        nets.append((lineno, Network(named, cost, losses)))
    if not nets:
        raise ValueError(f"{path}: the file holds no networks; expected {_CSV}")
    _check_unique(nets, path)
    return LossTable(columns, tuple(n for _, n in nets))


def write_networks_csv(path: str | Path, networks: Sequence[Network], tasks: Sequence[str] | None = None) -> None:
    """Write networks in the plain CSV format (``tasks`` gives the column order; default: first appearance)."""
    if tasks is None:
        tasks = list(dict.fromkeys(t for n in networks for t in n.tasks))
    tasks = list(tasks)
    for n in networks:
        unknown = [t for t in n.tasks if t not in tasks]
        if unknown:
            raise ValueError(f"network {n.label} has task {unknown[0]!r}, which is not a column ({tasks})")
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["tasks", "cost", *tasks])
    for n in networks:
        w.writerow(["|".join(n.tasks), repr(n.cost), *[repr(n.losses[t]) if t in n.losses else "" for t in tasks]])
    atomic_write_text(path, text.getvalue())


def read_networks(path: str | Path, tasks: Sequence[str] | None = None) -> LossTable:
    """Read either format: ``.csv`` files as plain CSV, any other file as a Standley results file.

    ``tasks`` names the columns of a Standley file; for a CSV file the header names them, and a given
    ``tasks`` must list the same names.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        table = read_networks_csv(path)
        if tasks is not None and set(tasks) != set(table.tasks):
            raise ValueError(f"{path}: task columns {list(table.tasks)} differ from the task names given "
                             f"({list(tasks)})")
        return table
    return read_standley_results(path, tasks)
