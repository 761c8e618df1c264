"""InterroGate (Bejnordi et al., ICML 2024): per-layer, per-task channel gates between task-specific
and shared features, trained under a compute budget and pruned to a static network.

Importing this package registers the ``interrogate`` method. Modules: ``gates`` (α, β, the
straight-through gate and the β mixture), ``gated_layers`` and ``network`` (the training-time gated
network), ``pruning`` and ``compiled`` (the static pruned network), ``serialization`` (saving and
loading it; FLOPs are counted by :mod:`taskgrouping.flops`), ``options``, ``objective`` (the sparsity loss),
``method`` (the registered method) and ``sweep`` (the λ_s trade-off sweep).
"""

from taskgrouping.methods.interrogate.compiled import CompiledInterroGate
from taskgrouping.methods.interrogate.gates import GatePoint, gate_select, mix_streams, straight_through_gate
from taskgrouping.methods.interrogate.method import build_interrogate_model, interrogate, single_task_model
from taskgrouping.methods.interrogate.network import GatedNetwork, build_gated_network
from taskgrouping.methods.interrogate.objective import InterroGateObjective, sparsity_loss
from taskgrouping.methods.interrogate.options import InterroGateOptions
from taskgrouping.methods.interrogate.pruning import prune_output_channels
from taskgrouping.methods.interrogate.serialization import (describe_module, load_compiled, module_from_description,
                                                            save_compiled)
from taskgrouping.methods.interrogate.sweep import (interrogate_sweep, interrogate_sweep_cli, plot_sharing,
                                                    plot_tradeoff, summarise_sweep, sweep_table)

__all__ = ["straight_through_gate", "gate_select", "mix_streams", "GatePoint", "GatedNetwork", "build_gated_network",
           "CompiledInterroGate", "save_compiled", "load_compiled",
           "describe_module", "module_from_description", "prune_output_channels", "InterroGateOptions",
           "sparsity_loss", "InterroGateObjective", "interrogate", "single_task_model", "build_interrogate_model",
           "interrogate_sweep", "interrogate_sweep_cli", "summarise_sweep", "sweep_table", "plot_tradeoff",
           "plot_sharing"]
