"""The counts a run will leave, without data: ``summary_only=true`` prints them per layer and writes ``summary.json``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from bnn_adapt import accounting
from bnn_adapt.accounting.operations import mac_table, operation_counts
from bnn_adapt.run import builders
from bnn_adapt.run.record import RunRecord
from bnn_adapt.run.results import config_hash


def configured_counts(cfg: DictConfig) -> tuple[nn.Module, RunRecord]:
    """The configured model, built without data, and its counts as the run will leave them
    (parameters, size, MACs for one image of ``data.image_size``)."""
    if cfg.task == "pretrain":
        model = builders.build_base(cfg)
        return model, base_counts(model, cfg.data.image_size)
    checkpoint = builders.base_checkpoint_file(cfg)
    have_checkpoint = checkpoint and Path(checkpoint).is_file()
    base = builders.load_trained_base(cfg) if have_checkpoint else builders.build_base(cfg)
    model = builders.build_adapted(cfg, base, builders.target_num_classes(cfg))
    plan = builders.pruning_plan(cfg)
    if plan is not None:
        plan.apply(model)  # the counts the run will leave
    return model, RunRecord(**accounting.summarize(model, cfg.data.image_size))


def base_counts(base: nn.Module, image_size: int) -> RunRecord:
    """A base's parameters and its MACs for one image of ``image_size``."""
    fp32, binary = accounting.totals(accounting.parameter_rows(base))
    return RunRecord(base_binary_params=binary, base_fp32_params=fp32, **operation_counts(base, image_size))


def run_summary(cfg: DictConfig) -> RunRecord:
    """Build the configured model, print its per-layer tables (parameters, MACs), write summary.json."""
    model, summary = configured_counts(cfg)
    print(accounting.layer_table(model))
    print(mac_table(summary.to_dict()))
    summary.task, summary.config_hash = cfg.task, config_hash(cfg)
    summary.write(Path(cfg.paths.output_dir) / "summary.json")
    return summary
