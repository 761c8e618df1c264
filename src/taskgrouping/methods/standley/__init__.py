"""Standley et al. (ICML 2020), "Which Tasks Should Be Learned Together in Multi-task Learning?".

The network selection of Section 3.2 (:mod:`.networks`, :mod:`.selection`), its approximations of
Section 3.3 (:mod:`.estimates`), the selection curves of the paper's figures (:mod:`.curve`), the
authors' loss files (:mod:`.io`) and the ``select`` command (:mod:`.cli`); the end-to-end methods
``optimal``, ``hoa`` and ``esa`` (:mod:`.method`, options in :mod:`.options`, half-size networks in
:mod:`.half_size`). Importing the package registers the methods.
"""

from taskgrouping.methods.standley.cli import parse_budgets, select_cli
from taskgrouping.methods.standley.curve import report_scores, selection_curve
from taskgrouping.methods.standley.estimates import esa_networks, hoa_networks
from taskgrouping.methods.standley.half_size import HALF_SIZE_BACKBONES, half_size_options
from taskgrouping.methods.standley.io import (LossTable, read_networks, read_networks_csv, read_standley_results,
                                              write_networks_csv)
from taskgrouping.methods.standley.method import esa, hoa, optimal
from taskgrouping.methods.standley.networks import Candidate, Network, Selection
from taskgrouping.methods.standley.options import (HOA_MAX_ESTIMATES, ESAOptions, HOAOptions, OptimalOptions,
                                                   StandleyOptions)
from taskgrouping.methods.standley.selection import (SEARCH_MAX_CANDIDATES, UNCOVERED, cheapest_cover_cost,
                                                    resolve_solver, select_networks)

__all__ = ["Network", "Candidate", "Selection", "select_networks", "cheapest_cover_cost", "UNCOVERED",
           "hoa_networks", "esa_networks", "report_scores", "selection_curve", "parse_budgets", "select_cli",
           "LossTable", "read_standley_results", "read_networks_csv", "write_networks_csv", "read_networks",
           "HALF_SIZE_BACKBONES", "half_size_options", "SEARCH_MAX_CANDIDATES", "resolve_solver", "HOA_MAX_ESTIMATES",
           "StandleyOptions", "OptimalOptions", "HOAOptions", "ESAOptions", "optimal", "hoa", "esa"]
