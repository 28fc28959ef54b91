"""Typed schemas of the config groups whose values have plain types, checked by Hydra at composition.

Each group's YAML files start with ``defaults: [_schema, _self_]`` (``conf/config.yaml`` names
``_tap_cache_schema@tap_cache`` for its ``tap_cache`` node); the dataclass here gives every key its
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


@dataclass
class DataSchema:
    _target_: str = MISSING
    name: str = MISSING
    root: str | None = MISSING
    base_classes: Any = MISSING  # class ids, or class names (imagefolder), or null
    target_classes: Any = MISSING
    image_size: int = MISSING
    batch_size: int = MISSING
    num_workers: int | None = MISSING
    on_device: bool | str = MISSING  # true, false or auto
    limit_per_class: int | None = MISSING
    eval_limit_per_class: int | None = MISSING
    val_fraction: float = MISSING
    download: bool = MISSING
    augment: bool = MISSING
    normalize_mean: list[float] | None = MISSING
    normalize_std: list[float] | None = MISSING
    seed: int = MISSING


@dataclass
class AdapterSchema:
    """The keys every strategy has; ``model`` holds the strategy's constructor arguments."""

    name: str = MISSING
    lr: float = MISSING
    bits: int = MISSING
    model: Any = MISSING


@dataclass
class ParallelSchema(AdapterSchema):
    groups: int | str | None = MISSING  # an integer, `channels` or null
    head: str = MISSING


@dataclass
class SerialSchema(AdapterSchema):
    groups: int | str | None = MISSING
    stages: list[int] = MISSING


@dataclass
class LoRASchema(AdapterSchema):
    rank: int = MISSING
    alpha: float = MISSING
    stages: list[int] | None = MISSING


@dataclass
class PreciseBNSchema:
    enabled: bool = MISSING
    batches: int = MISSING
    every_epoch: bool = MISSING
    adaptation: bool = MISSING


@dataclass
class PretrainSchema:
    epochs: int = MISSING
    lr: float = MISSING


@dataclass
class BaseSchema:
    name: str = MISSING
    width: float = MISSING
    bn: str = MISSING
    epoch: str = MISSING
    checkpoint: str | None = MISSING
    save_to: str | None = MISSING
    how_to_get: str = MISSING
    pretrain: PretrainSchema | None = MISSING
    precise_bn: PreciseBNSchema = MISSING
    net: Any = MISSING  # the class (_target_) and its constructor arguments
    file: str | None = MISSING  # set by conf/config.yaml: task=predict's packed base


@dataclass
class STEBaseSchema(BaseSchema):
    block: str = MISSING
    binarize: str = MISSING


@dataclass
class TrainerSchema:
    """Lightning's arguments (untyped: Lightning checks them) and ours (typed)."""

    _target_: str = MISSING
    default_root_dir: Any = MISSING
    max_epochs: int = MISSING
    accelerator: Any = MISSING
    devices: Any = MISSING
    precision: Any = MISSING
    log_every_n_steps: Any = MISSING
    num_sanity_val_steps: Any = MISSING
    limit_train_batches: Any = MISSING
    limit_val_batches: Any = MISSING
    deterministic: Any = MISSING
    enable_progress_bar: Any = MISSING
    enable_model_summary: Any = MISSING
    channels_last: bool = MISSING
    compile: bool | str = MISSING  # true, false or a torch.compile backend name


@dataclass
class DDPTrainerSchema(TrainerSchema):
    strategy: Any = MISSING
    sync_batchnorm: bool = MISSING


@dataclass
class SlurmTrainerSchema(DDPTrainerSchema):
    num_nodes: Any = MISSING
    plugins: Any = MISSING


@dataclass
class SearchSchema:
    storage: str = MISSING
    study: str = MISSING
    trial: int | None = MISSING
    groups: list[int | str] | None = MISSING  # adapter.groups to propose: integers and `channels`
    pruner: Any = None  # an Optuna pruner (search/pruner=NAME, conf/search/pruner/); null: none


@dataclass
class TapCacheSchema:
    enabled: bool = MISSING
    views: int = MISSING
    max_gb: float | None = MISSING


SCHEMAS = {
    ("export", "_schema"): ExportSchema,
    ("predict", "_schema"): PredictSchema,
    ("evaluate", "_schema"): EvaluateSchema,
    ("reduction", "_schema_none"): NoReductionSchema,
    ("reduction", "_schema_prune"): PruneSchema,
    ("reduction", "_schema_prune_iterative"): IterativePruneSchema,
    ("data", "_schema"): DataSchema,
    ("adapter", "_schema"): AdapterSchema,
    ("adapter", "_schema_parallel"): ParallelSchema,
    ("adapter", "_schema_serial"): SerialSchema,
    ("adapter", "_schema_lora"): LoRASchema,
    ("base", "_schema"): BaseSchema,
    ("base", "_schema_ste"): STEBaseSchema,
    ("trainer", "_schema"): TrainerSchema,
    ("trainer", "_schema_ddp"): DDPTrainerSchema,
    ("trainer", "_schema_ddp_slurm"): SlurmTrainerSchema,
    ("search", "_schema"): SearchSchema,
    (None, "_tap_cache_schema"): TapCacheSchema,  # conf/config.yaml's tap_cache node
}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (before any config is composed)."""
    store = ConfigStore.instance()
    for (group, name), schema in SCHEMAS.items():
        store.store(group=group, name=name, node=schema)
