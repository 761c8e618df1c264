"""The main job: the multimnist preset runs DMTG and label_clusters beside the baselines, a run draws
``figures/comparison.png`` (NormGain against training time), and with many tasks the console shows
group sizes and a few names per group while ``table.md`` and ``results.json`` keep every name."""

import json
import struct

import pytest

from taskgrouping.config import build_config, load_preset
from taskgrouping.experiment import run_experiment
from taskgrouping.figures import comparison_figure, comparison_points, normgain_key
from taskgrouping.report import console_table, group_sizes, grouping_lines, groups_inline, results_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk (read by hand: the PNG specification, not our code)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_multimnist_preset_runs_the_grouping_methods_beside_the_baselines():
    preset = load_preset("multimnist")
    assert preset["methods"] == ["naive_mtl", "single_task", "random", "label_clusters", "dmtg"]
    assert preset["K"] == 2 and build_config(preset="multimnist")["reference"] == "naive_mtl"


# -- the console with many tasks ------------------------------------------------------------------------

def summary_of(groupings, names):
    """A results summary as ``summarise`` writes it, with only what the table reads."""
    methods = {m: {"grouping": g, "per_task": {}, "total_test_loss": 1.0 + i, "train_seconds": 2.0 * (i + 1),
                   "norm_gain_l": 0.1 * i} for i, (m, g) in enumerate(groupings.items())}
    return {"methods": methods, "dataset": {"name": "synthetic", "tasks": names}, "seed": 0, "K": 3,
            "reference": "naive_mtl", "conventions": {"epoch_selection": "best validation loss"}}


NAMES = [f"t{i:03d}" for i in range(139)]
THIRDS = [NAMES[:47], NAMES[47:93], NAMES[93:]]


def test_console_with_139_tasks_shows_sizes_and_at_most_four_names_per_group():
    summary = summary_of({"naive_mtl": [NAMES], "single_task": [[n] for n in NAMES], "dmtg": THIRDS}, NAMES)
    text = console_table(summary, where="DIR/table.md")
    lines = text.split("\n")
    start = lines.index("- naive_mtl: 1 group (sizes 139)")
    assert lines[start:] == [  # hand-written: 139 = 47 + 46 + 46; 4 names shown, the rest counted
        "- naive_mtl: 1 group (sizes 139)",
        "    {t000, t001, t002, t003, … (+135 more)}",
        "- single_task: 139 groups (sizes 1 ×139)",
        "    {t000}", "    {t001}", "    {t002}", "    {t003}", "    {t004}", "    {t005}",
        "    … (+133 more groups)",
        "- dmtg: 3 groups (sizes 47, 46 ×2)",
        "    {t000, t001, t002, t003, … (+43 more)}",
        "    {t047, t048, t049, t050, … (+42 more)}",
        "    {t093, t094, t095, t096, … (+42 more)}",
        "(every group in full: DIR/table.md)",
    ]
    assert max(len(line) for line in lines if not line.startswith("|")) <= 100
    # the table rows are results_table's, and the file version keeps every name of every group
    full = results_table(summary)
    assert [x for x in lines if x.startswith("|")] == [x for x in full.split("\n") if x.startswith("|")]
    dmtg_line = next(x for x in full.split("\n") if x.startswith("- dmtg: "))
    assert all(n in dmtg_line for n in NAMES) and len(dmtg_line) > 139 * 4


def test_console_with_few_tasks_is_the_table_unchanged():
    names = [f"task_{i}" for i in range(8)]
    summary = summary_of({"naive_mtl": [names], "dmtg": [names[:4], names[4:]]}, names)
    assert console_table(summary, where="DIR/table.md") == results_table(summary)
    assert groups_inline([names[:4], names[4:]], 8) == str([names[:4], names[4:]])


def test_group_sizes_and_inline_counts():
    assert group_sizes(THIRDS) == "47, 46 ×2"
    assert group_sizes([[n] for n in NAMES]) == "1 ×139"
    assert groups_inline(THIRDS, 139) == "3 groups (sizes 47, 46 ×2)"
    assert grouping_lines("x", [["a", "b"]]) == ["- x: 1 group (sizes 2)", "    {a, b}"]


# -- the comparison figure ------------------------------------------------------------------------------

def test_comparison_points_are_training_seconds_and_normgain(tmp_path):
    summary = summary_of({"naive_mtl": [["a", "b"]], "single_task": [["a"], ["b"]], "dmtg": [["a"], ["b"]]},
                         ["a", "b"])
    key, points = comparison_points(summary)
    assert key == "norm_gain_l"
    assert points == [("naive_mtl", 2.0, 0.0), ("single_task", 4.0, 0.1), ("dmtg", 6.0, 0.2)]
    for i, rec in enumerate(summary["methods"].values()):  # a NormGain_M in every record is preferred
        rec["norm_gain_m"] = -0.5 * i
    assert comparison_points(summary)[1][2] == ("dmtg", 6.0, -1.0)
    summary["methods"]["dmtg"]["norm_gain_m"] = None  # ... only when every method has one
    assert normgain_key(summary["methods"]) == "norm_gain_l"
    path = comparison_figure(summary, tmp_path / "figs" / "comparison.png")
    width, height = png_size(path)
    assert width > 300 and height > 200 and [p.name for p in path.parent.iterdir()] == ["comparison.png"]
    for rec in summary["methods"].values():
        rec["norm_gain_l"] = rec["norm_gain_m"] = None
    with pytest.raises(ValueError, match="no method has a NormGain"):
        comparison_points(summary)


# -- a whole run ----------------------------------------------------------------------------------------

def test_run_draws_the_comparison_and_prints_compact_groups(tmp_path):
    cfg = build_config(preset="planted", overrides=[
        "data.n_tasks=20", "data.n_train=120", "data.n_val=60", "data.n_test=60", "K=2",
        "methods=[naive_mtl,label_clusters,dmtg]", "train.epochs=2", "train.progress=false"])
    echoed = []
    summary = run_experiment(cfg, tmp_path / "run", echo=echoed.append)
    figures = tmp_path / "run" / "figures"
    assert summary["figures"] == {"dmtg_assignment": str(figures / "dmtg_assignment.png"),
                                  "comparison": str(figures / "comparison.png")}
    assert sorted(p.name for p in figures.iterdir()) == ["comparison.png", "dmtg_assignment.png"]
    png_size(figures / "comparison.png")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["figures"] == summary["figures"]
    # 20 tasks: the per-method lines give sizes; the final table at most 4 names per group
    naive = next(line for line in echoed if line.startswith("[naive_mtl] total test loss"))
    assert naive.endswith("groups 1 group (sizes 20)")
    console, names = echoed[-1].split("\n"), summary["dataset"]["tasks"]
    assert "- naive_mtl: 1 group (sizes 20)" in console
    assert "    {" + ", ".join(names[:4]) + ", … (+16 more)}" in console
    table = (tmp_path / "run" / "table.md").read_text()
    assert "- naive_mtl: {" + ", ".join(names) + "}" in table


def test_run_without_the_reference_draws_no_comparison(tmp_path):
    cfg = build_config(preset="digits", overrides=["methods=[label_clusters]", "train.epochs=1",
                                                   "train.progress=false"])
    echoed = []
    summary = run_experiment(cfg, tmp_path / "run", echo=echoed.append)
    assert "no comparison figure: the reference method 'naive_mtl' was not run" in echoed
    assert summary["figures"] == {} and not (tmp_path / "run" / "figures" / "comparison.png").exists()
    assert echoed[-1] == results_table(summary)  # 4 tasks: the console shows the table as is
