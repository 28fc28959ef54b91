"""Short names for what a run did, from its own config (tables, reports, export file names)."""

from __future__ import annotations

from bnn_adapt.adapters import STRATEGIES


def run_label(metrics: dict) -> str:
    """A short name for what a run did: the strategy's own part (``AdaptedModel.describe``), then its groups,
    pruning and bits, e.g. ``serial stages 1,2,3 g=10 prune 0.9``."""
    cfg = metrics.get("config", {})
    adapter, reduction = cfg.get("adapter", {}), cfg.get("reduction", {})
    name = adapter.get("name", metrics.get("strategy", "?"))
    label = STRATEGIES[name].describe(adapter) if name in STRATEGIES else name
    if adapter.get("groups") is not None:
        label += f" g={adapter['groups']}"
    elif reduction.get("name") == "groups" or (reduction.get("groups", 1) not in (1, None)):  # a run written by 0.1
        label += f" g={reduction.get('groups')}"
    if reduction.get("name") == "prune":
        label += f" prune {reduction.get('rate')}"
    if reduction.get("name") == "prune_iterative":
        rewind = " rewind" if reduction.get("rewind") else ""
        label += f" prune {reduction.get('rate')} in {reduction.get('rounds')} rounds{rewind}"
    if reduction.get("head_rate"):
        label += f" head columns {reduction.get('head_rate')}"
    if adapter.get("bits", 32) != 32:
        label += f" {adapter['bits']}-bit"
    return label
