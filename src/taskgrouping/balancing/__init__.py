"""Multi-task optimisation: balancers that turn per-task losses into one update (Mao et al. 2024).

* :mod:`.base`: the :class:`~.base.Balancer` contract and the registry (``get_balancer``);
* :mod:`.catalogue`: imports every family below, so the registry is complete;
* :mod:`.task_gradients`: per-task gradients, Jacobians and feature taps (used by the balancers
  and the diagnostics alike);
* :mod:`.gradient_balancer`: the base of the methods that aggregate per-task gradients, at
  parameter or feature level;
* families: :mod:`.loss_weighting`, :mod:`.learned_weighting`, :mod:`.gradient_weighting`,
  :mod:`.gradient_surgery`, :mod:`.multi_objective`, :mod:`.cosreg`;
* their numerics: :mod:`.task_weights` (learnable weights), :mod:`.gramian_weightings` and
  :mod:`.solvers` (task weights from the Gramian), :mod:`.torchjd_adapter` (TorchJD);
* :mod:`.study`: the balancer study (``taskgrouping balance-bench``).

The package imports nothing on its own, so the trainer can import :mod:`.base` cheaply.
"""
