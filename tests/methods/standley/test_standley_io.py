"""Loss-table readers: Standley's results files (layout described in the data README) and plain CSV."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest

from conftest import GROUPING_DATA
from taskgrouping.methods.standley import (
    LossTable,
    Network,
    read_networks,
    read_networks_csv,
    read_standley_results,
    select_networks,
    write_networks_csv,
)

DATA = GROUPING_DATA
RESULTS = DATA / "standley_taskgrouping" / "network_selection"
TASKS = ("task0", "task1", "task2", "task3", "task4")


def test_standley_file_layout():
    table = read_standley_results(RESULTS / "results.txt")
    assert isinstance(table, LossTable) and table.tasks == TASKS
    nets = table.networks
    assert len(nets) == 36
    # README: line 1 = five half-sized singles (cost 0.5); then 31 full-sized networks in the order
    # singles, pairs, triples, quadruples, all five, lexicographic by column index within a size.
    assert [n.cost for n in nets] == [0.5] * 5 + [1.0] * 31
    assert [n.tasks for n in nets[:5]] == [(t,) for t in TASKS]
    assert [n.tasks for n in nets[5:]] == [c for k in range(1, 6) for c in combinations(TASKS, k)]
    # First line of results.txt: 0.08021 0.1739 0.08965 0.09264 0.03313; line 2: 0.08039 in column 0.
    assert [n.losses[n.tasks[0]] for n in nets[:5]] == [0.08021, 0.1739, 0.08965, 0.09264, 0.03313]
    assert dict(nets[5].losses) == {"task0": 0.08039}


def test_standley_file_with_a_missing_network():
    # results_alt_20.txt has one pair fewer than the final-loss file of the same setting.
    early = read_standley_results(RESULTS / "results_alt_20.txt").networks
    final = read_standley_results(RESULTS / "results_alt_test.txt").networks
    assert len(early) == 35 and len(final) == 36
    assert {n.key for n in final} - {n.key for n in early} == {(frozenset({"task1", "task2"}), 1.0)}


def test_standley_task_names_and_costs():
    table = read_standley_results(RESULTS / "results.txt", ["s", "d", "n", "k", "t"], half_cost=0.25, full_cost=2)
    assert table.tasks == ("s", "d", "n", "k", "t")
    assert table.networks[0] == Network(("s",), 0.25, {"s": 0.08021})
    assert table.networks[-1].cost == 2.0 and set(table.networks[-1].tasks) == set("sdnkt")
    with pytest.raises(ValueError, match=r"results\.txt, line 1: 5 tab-separated fields, but 3 task names"):
        read_standley_results(RESULTS / "results.txt", ["a", "b", "c"])


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_standley_wrong_column_count_names_file_and_line(tmp_path):
    p = _write(tmp_path, "bad.txt", "0.1\t0.2\t0.3\n0.1\t\t\n\t0.2\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 3: expected 3 tab-separated fields.*found 2"):
        read_standley_results(p)


def test_standley_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"nan\.txt, line 2, column 2 \(task1\).*finite"):
        read_standley_results(_write(tmp_path, "nan.txt", "0.1\t0.2\n0.1\tnan\n"))
    with pytest.raises(ValueError, match=r"word\.txt, line 2, column 1 \(task0\): 'abc' is not a number"):
        read_standley_results(_write(tmp_path, "word.txt", "0.1\t0.2\nabc\t\n"))
    with pytest.raises(ValueError, match=r"blank\.txt, line 2: no loss"):
        read_standley_results(_write(tmp_path, "blank.txt", "0.1\t0.2\n\t\n0.1\t0.2\n"))
    dup = r"dup\.txt, line 3: network task0 \(cost 1\) is listed again \(first on line 2"
    with pytest.raises(ValueError, match=dup):
        read_standley_results(_write(tmp_path, "dup.txt", "0.1\t0.2\n0.1\t\n0.3\t\n"))
    with pytest.raises(FileNotFoundError):
        read_standley_results(tmp_path / "missing.txt")
    # Trailing blank lines are fine.
    assert len(read_standley_results(_write(tmp_path, "ok.txt", "0.1\t0.2\n0.1\t0.3\n\n")).networks) == 3


CSV = """tasks,cost,seg,depth,normal
seg,0.5,0.08,,
seg|depth,1,0.0804,0.1695,
seg|depth|normal,1,0.081,0.1702,0.0859
depth|normal,1,,0.17,0.087
"""


def test_csv_reader(tmp_path):
    table = read_networks_csv(_write(tmp_path, "losses.csv", CSV))
    assert table.tasks == ("seg", "depth", "normal")
    assert table.networks[0] == Network(("seg",), 0.5, {"seg": 0.08})
    assert table.networks[2] == Network(("seg", "depth", "normal"), 1,
                                        {"seg": 0.081, "depth": 0.1702, "normal": 0.0859})
    # Hand check at budget 1.5: 3-task net + half seg = 0.08 + 0.1702 + 0.0859 = 0.3361 beats half seg +
    # depth|normal (0.337) and the 3-task net alone (0.3371); seg|depth cannot add normal for 0.5.
    sel = select_networks(table.networks, 1.5)
    assert sel.total == pytest.approx(0.3361, abs=1e-12)
    assert {(n.tasks, n.cost) for n in sel.networks} == {(("seg",), 0.5), (("seg", "depth", "normal"), 1.0)}


def test_csv_letters_and_empty_tasks_field(tmp_path):
    p = _write(tmp_path, "letters.csv", "tasks,cost,s,d,n\nsd,1,0.1,0.2,\n,1,,,0.3\ns,0.5,0.4,,\n")
    nets = read_networks_csv(p).networks
    assert [n.tasks for n in nets] == [("s", "d"), ("n",), ("s",)]


def test_csv_round_trip_of_a_standley_file(tmp_path):
    table = read_standley_results(RESULTS / "results_small_data.txt")
    p = tmp_path / "small.csv"
    write_networks_csv(p, table.networks, table.tasks)
    again = read_networks(p)
    assert again == table
    for b in (1.5, 3):
        assert select_networks(again.networks, b).networks == select_networks(table.networks, b).networks


@pytest.mark.parametrize("text, msg", [
    ("tasks,cost,a,b\na|b,1,0.1\n", r"bad\.csv, line 2: expected 4 comma-separated columns.*found 3"),
    ("tasks,cost,a,b\na|b,1,0.1,0.2\na|c,1,0.1,\n", r"bad\.csv, line 3: unknown task 'c'.*\['a', 'b'\]"),
    ("tasks,cost,ab,cd\nab|xy,1,0.1,\n", r"line 2: unknown task 'xy'"),
    ("tasks,cost,a,b\na,1,0.1,0.2\n", r"line 2: the tasks field names \['a'\] but losses are given for \['a', 'b'\]"),
    ("tasks,cost,a,b\na,cheap,0.1,\n", r"line 2, column 'cost': 'cheap' is not a number"),
    ("tasks,cost,a,b\na,-1,0.1,\n", r"line 2, column 'cost': cost must be >= 0"),
    ("tasks,cost,a,b\na,1,inf,\n", r"line 2, column 'a': expected a finite number"),
    ("network,cost,a\n", r"bad\.csv, line 1: header must be 'tasks,cost,<task>,\.\.\.'"),
    ("tasks,cost,a,a\n", r"line 1: task column names must be non-empty and distinct"),
    ("tasks,cost,a,b\n,1,,\n", r"line 2: the network has no task"),
    ("tasks,cost,a,b\na,1,0.1,\na,1,0.2,\n", r"line 3: network a \(cost 1\) is listed again \(first on line 2\)"),
    ("tasks,cost,a\n", r"bad\.csv: the file holds no networks"),
])
def test_csv_bad_input(tmp_path, text, msg):
    with pytest.raises(ValueError, match=msg):
        read_networks_csv(_write(tmp_path, "bad.csv", text))


def test_read_networks_dispatch(tmp_path):
    p = _write(tmp_path, "losses.csv", CSV)
    assert read_networks(p).tasks == ("seg", "depth", "normal")
    with pytest.raises(ValueError, match=r"losses\.csv: task columns .* differ from the task names given"):
        read_networks(p, tasks=["seg", "depth", "edges"])
    assert read_networks(RESULTS / "results_test.txt", tasks=list("sdnkt")).tasks == tuple("sdnkt")


def test_write_rejects_networks_outside_the_columns(tmp_path):
    with pytest.raises(ValueError, match=r"task 'c', which is not a column"):
        write_networks_csv(tmp_path / "x.csv", [Network(("a", "c"), 1, {"a": 1, "c": 2})], ["a", "b"])
