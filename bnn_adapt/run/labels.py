"""Short names for what a run did, from its own config (tables, reports, export file names)."""

from __future__ import annotations


def run_label(metrics: dict) -> str:
    """A short name for what a run did, e.g. ``serial g=10 stages 1,2,3``."""
    cfg = metrics.get("config", {})
    adapter, reduction = cfg.get("adapter", {}), cfg.get("reduction", {})
    label = adapter.get("name", metrics.get("strategy", "?"))
    if label == "serial":
        label += f" stages {','.join(str(s) for s in adapter.get('stages', []))}"
    if label == "udta":
        label += f" head={adapter.get('head')}"
    if adapter.get("groups") is not None:
        label += f" g={adapter['groups']}"
    elif reduction.get("name") == "groups" or (reduction.get("groups", 1) not in (1, None)):  # a run written by 0.1
        label += f" g={reduction.get('groups')}"
    if label == "lora":
        stages = adapter.get("stages")
        label += f" r={adapter.get('rank')}" + (f" stages {','.join(str(s) for s in stages)}" if stages else "")
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
