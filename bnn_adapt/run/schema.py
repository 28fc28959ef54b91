"""Typed schemas of the config groups whose values have plain types, checked by Hydra at composition.

Each group's YAML files start with ``defaults: [_schema, _self_]``; the dataclass here gives every key its
type and no value (the YAML says the value and why, and the configuration reference shows the YAML). A value
of the wrong type or a key the group does not have fails when the config is composed, in one message naming
the key (OmegaConf structured configs: omegaconf.readthedocs.io, "Structured Configs"); ranges and checks
across keys stay in :func:`bnn_adapt.run.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ExportSchema:
    dir: str = MISSING
    adapter_run: Any = MISSING  # a run directory or a list of them
    dtype: str = MISSING


@dataclass
class PredictSchema:
    top_k: int = MISSING
    batch_size: int = MISSING
    output: str = MISSING
    packed: bool = MISSING


@dataclass
class EvaluateSchema:
    adapter: str | None = MISSING
    metrics: str = MISSING
    predictions: str = MISSING


@dataclass
class NoReductionSchema:
    name: str = MISSING


@dataclass
class PruneSchema(NoReductionSchema):
    rate: float = MISSING
    depthwise_rate: float = MISSING
    pointwise_rate: float = MISSING
    head_rate: float = MISSING
    at_epoch: int | None = MISSING


@dataclass
class IterativePruneSchema(NoReductionSchema):
    rate: float = MISSING
    depthwise_rate: float = MISSING
    pointwise_rate: float = MISSING
    head_rate: float = MISSING
    rounds: int = MISSING
    at_epochs: list[int] | None = MISSING
    rewind: bool = MISSING


SCHEMAS = {
    ("export", "_schema"): ExportSchema,
    ("predict", "_schema"): PredictSchema,
    ("evaluate", "_schema"): EvaluateSchema,
    ("reduction", "_schema_none"): NoReductionSchema,
    ("reduction", "_schema_prune"): PruneSchema,
    ("reduction", "_schema_prune_iterative"): IterativePruneSchema,
}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (before any config is composed)."""
    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=group, name=name, node=schema)
