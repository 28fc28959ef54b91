"""Adapt frozen binary neural networks to new image tasks with tiny, swappable adapters.

The package is a house with floors that data walks down once:
:mod:`bnn_adapt.run` (the task, builders, config) -> :mod:`bnn_adapt.training`
(Lightning module, data, pruning, lean backprop, tap cache) -> :mod:`bnn_adapt.adapters`
and :mod:`bnn_adapt.bases` -> :mod:`bnn_adapt.nn` (binary layers, quantizers);
:mod:`bnn_adapt.accounting` counts. :mod:`bnn_adapt.deploy` (packed base, export,
predict) and :mod:`bnn_adapt.tools` (tables, reports, search plots, benchmarks)
sit beside, importing the core.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: 0.1's flat modules -> where they live since 0.2.0 (CHANGELOG.md); the old names still import (and run
#: with ``python -m``), with a deprecation warning
MOVED = {
    "bnn_adapt.adapter_file": "bnn_adapt.adapters.file",
    "bnn_adapt.allocator": "bnn_adapt.training.allocator",
    "bnn_adapt.bench": "bnn_adapt.tools.bench",
    "bnn_adapt.binary": "bnn_adapt.nn.layers",
    "bnn_adapt.callbacks": "bnn_adapt.training.callbacks",
    "bnn_adapt.config": "bnn_adapt.run.config",
    "bnn_adapt.data": "bnn_adapt.training.datamodule",
    "bnn_adapt.export": "bnn_adapt.deploy.export",
    "bnn_adapt.lean": "bnn_adapt.training.lean",
    "bnn_adapt.lit_module": "bnn_adapt.training.module",
    "bnn_adapt.packed_base": "bnn_adapt.deploy.packed_base",
    "bnn_adapt.pareto": "bnn_adapt.tools.pareto",
    "bnn_adapt.predict": "bnn_adapt.deploy.predict",
    "bnn_adapt.pruning": "bnn_adapt.training.pruning",
    "bnn_adapt.report": "bnn_adapt.tools.report",
    "bnn_adapt.results": "bnn_adapt.run.results",
    "bnn_adapt.resume": "bnn_adapt.run.resume",
    "bnn_adapt.sizes": "bnn_adapt.tools.sizes",
    "bnn_adapt.strategies": "bnn_adapt.adapters",
    "bnn_adapt.synthetic": "bnn_adapt.tools.synthetic",
    "bnn_adapt.tables": "bnn_adapt.tools.tables",
    "bnn_adapt.tap_cache": "bnn_adapt.training.tap_cache",
    "bnn_adapt.task": "bnn_adapt.run.task",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import bnn_adapt.strategies`` gives ``bnn_adapt.adapters`` itself (one module, one class
    identity); ``python -m bnn_adapt.tables`` runs ``bnn_adapt.tools.tables``."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass

    def get_code(self, name):  # python -m OLD_NAME
        print(f"note: {name} moved to {MOVED[name]}; run python -m {MOVED[name]}", file=sys.stderr)
        return importlib.util.find_spec(MOVED[name]).loader.get_code(MOVED[name])

    def is_package(self, name):
        return False


sys.meta_path.append(_MovedModules())
