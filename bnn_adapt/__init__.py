"""Adapt frozen binary neural networks to new image tasks with tiny, swappable adapters.

The package is a house with floors that data walks down once:
:mod:`bnn_adapt.run` (the task, builders, config) -> :mod:`bnn_adapt.training`
(Lightning module, data, pruning, lean backprop, tap cache) -> :mod:`bnn_adapt.adapters`
and :mod:`bnn_adapt.bases` -> :mod:`bnn_adapt.nn` (binary layers, quantizers);
:mod:`bnn_adapt.accounting` counts. :mod:`bnn_adapt.deploy` (packed base, export,
predict), :mod:`bnn_adapt.search` (the Optuna search's storages, hooks and Pareto
front) and :mod:`bnn_adapt.thesis` (the thesis's tables, figures and claims) sit
beside, importing the core. The benchmarks live outside the package, in ``benchmarks/``.
"""
