"""The one definition of what a run writes to ``metrics.json``, and of when it still counts.

A :class:`RunRecord` is a run's numbers and what they depend on: the config and its hash, the
results schema, the data it read, the base checkpoint, package versions and the machine
(README, reproducibility). Pretraining, adaptation and a count-only run (``summary.json``)
fill different fields; those they do not measure stay None and are left out of the file.
Every writer builds one and every reader reads one (:meth:`RunRecord.read`); a run stands
for a config only while everything its numbers depend on is as it was (:func:`result_problem`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from bnn_adapt.errors import UserError
from bnn_adapt.files import write_json
from bnn_adapt.run.results import config_hash, dataset_identity

#: what the numbers of a record mean. Bump it when a recorded metric changes its meaning
#: (measured on another split, counted another way): every run written before then runs again.
#: Files without the field were written under schema 1.
RESULTS_SCHEMA = 1

COMPLETE = "complete"  # every step ran
FAILED = "failed"  # the run stopped with ``error``
FAILED_AFTER_TRAINING = "failed_after_training"  # every epoch ran and was measured, ``failed_step`` did not
PRUNED = "pruned"  # a search's trial its pruner stopped (bnn_adapt.search.trial_report)

#: what Lightning logs per epoch (bnn_adapt.training.module), as a record's ``history`` holds it
EPOCH_TOP1 = "val/acc"  # the evaluated split's top-1: validation, or the test set as in the thesis
EPOCH_LOSS = "train/loss_epoch"


class RecordError(UserError):
    """A file that should hold a run's record holds something else."""


@dataclass
class DataIdentity:
    """Where a run read its data and a fingerprint of its files (bnn_adapt.training.data_fingerprint)."""

    location: str | None = None  # the folder (or bundled source) the data came from
    files: int | None = None  # how many files the fingerprint covers
    fingerprint: str | None = None  # a hash of their names, sizes and times


@dataclass
class Environment:
    """What besides the config and package versions decides a run's numbers to the bit (run.provenance)."""

    threads: int | None = None  # torch's intra-op threads: they decide the order floats are summed in
    cpu_capability: str | None = None  # the CPU kernels torch picked (AVX2, AVX512)
    cuda: str | None = None  # torch's CUDA build
    gpu: str | None = None  # the GPU's name, None on CPU
    git_commit: str | None = None  # the checkout's commit, ``+dirty`` with changes


@dataclass
class ThesisCounts:
    """Size in the thesis's own convention, chapter 6: backbone plus a plain head (accounting.thesis)."""

    base_fp32_params: int | None = None
    base_binary_params: int | None = None
    introduced_fp32_params: int | None = None
    introduced_binary_params: int | None = None
    size_pct: float | None = None  # introduced bits in % of the base's
    introduced_quantized_params: int | None = None

    @property
    def introduced_weights(self) -> int | None:
        if self.introduced_fp32_params is None or self.introduced_binary_params is None:
            return None
        return self.introduced_fp32_params + self.introduced_binary_params + (self.introduced_quantized_params or 0)


NESTED = {"data": DataIdentity, "environment": Environment, "thesis": ThesisCounts}


@dataclass
class RunRecord:
    """What a run writes to ``metrics.json`` (count-only runs: ``summary.json``); None: not measured."""

    # what the run is and where it stands
    status: str = COMPLETE  # COMPLETE, FAILED, FAILED_AFTER_TRAINING or PRUNED
    task: str | None = None  # pretrain, adapt or evaluate
    seed: int | None = None
    config_hash: str | None = None  # bnn_adapt.run.results.config_hash
    results_schema: int = 1  # RESULTS_SCHEMA when written (files without it: 1)
    failed_step: str | None = None  # FAILED_AFTER_TRAINING: the step after training that failed
    error: str | None = None  # FAILED, FAILED_AFTER_TRAINING: ``Type: message``
    pruned_after_epoch: int | None = None  # PRUNED: the last epoch it trained
    same_as: str | None = None  # a search's trial whose configuration that run directory trained
    # what its numbers depend on
    data: DataIdentity | None = None
    base_checkpoint_sha256: str | None = None  # adapt, evaluate: the bytes of the base it adapted or evaluated
    base_origin: str | None = None  # adapt: who wrote that base (bnn_adapt, the thesis code, its authors' release)
    versions: dict[str, str] | None = None  # python and the packages that compute (results.package_versions)
    environment: Environment | None = None
    # training (bnn_adapt.training.callbacks.RunStats)
    epoch_time_s: float | None = None  # mean wall time of an epoch, training and evaluation
    step_time_s: float | None = None  # mean wall time of a training step
    peak_mem_bytes: int | None = None
    epochs_run: int | None = None
    device: str | None = None
    history: list[dict] | None = None  # per epoch: ``epoch`` and what Lightning logged (EPOCH_TOP1, EPOCH_LOSS)
    # accuracy: the last epoch's, the best epoch's, and with each kind of BN statistics (training.precise_bn)
    test_top1: float | None = None  # the headline: the test set, measured once with the final weights
    val_top1: float | None = None  # the validation split's (data.val_fraction > 0), what a search judges
    best_test_top1: float | None = None
    best_val_top1: float | None = None
    best_before_pruning_top1: float | None = None  # reduction=prune: the best epoch before its first round
    test_top1_averaged_bn: float | None = None
    test_top1_precise_bn: float | None = None
    val_top1_averaged_bn: float | None = None
    val_top1_precise_bn: float | None = None
    best_epoch_top1_precise_bn: float | None = None  # pretrain: the kept best epoch with re-estimated statistics
    # pretraining's files
    base_checkpoint: str | None = None  # the last epoch (base.save_to); evaluate: the base file it read
    best_epoch_checkpoint: str | None = None
    best_epoch: int | None = None  # 0-based
    # counts (bnn_adapt.accounting: summarize, operation_counts)
    strategy: str | None = None
    macs_binary: int | None = None  # per image of mac_image_size
    macs_fp32: int | None = None
    binary_mac_share: float | None = None
    adapter_macs: int | None = None
    head_macs: int | None = None
    mac_image_size: int | None = None
    macs_per_layer: list[dict] | None = None
    base_binary_params: int | None = None
    base_fp32_params: int | None = None
    adapter_fp32_params: int | None = None
    adapter_binary_params: int | None = None
    head_fp32_params: int | None = None
    head_binary_params: int | None = None
    introduced_fp32_params: int | None = None  # adapter + new head
    introduced_binary_params: int | None = None
    weight_bits: int | None = None  # adapter.bits
    adapter_quantized_params: int | None = None  # weights at weight_bits < 32
    head_quantized_params: int | None = None
    introduced_quantized_params: int | None = None
    size_pct: float | None = None  # introduced bits in % of the base's, each weight at its real width
    adapter_size_pct: float | None = None
    head_size_pct: float | None = None
    base_bits: int | None = None
    introduced_bits: int | None = None
    thesis: ThesisCounts | None = None  # the same in the thesis's convention
    class_names: list[str] | None = None  # adapt, evaluate: the classes, in output order
    # evaluation (task=evaluate): the test split once, image by image in predictions_file; test_top1 is its top-1
    adapter_file: str | None = None  # the adapter evaluated on the base (None: the base alone, on its base classes)
    test_images: int | None = None
    per_class_top1: dict[str, float] | None = None  # by class name: the share of its test images predicted as it
    confusion_matrix: list[list[int]] | None = None  # [true class][predicted class], both in class_names order
    predictions_file: str | None = None  # predictions.csv: source, label, predicted per test image
    config: dict | None = None  # the resolved config it ran
    run_dir: Path | None = field(default=None, compare=False)  # where it was read from; not written

    def __post_init__(self):
        for name, kind in NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind(**value))

    # -------------------------------------------------------------- what the numbers say

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def failed(self) -> bool:
        return self.status in (FAILED, FAILED_AFTER_TRAINING)

    @property
    def introduced_weights(self) -> int | None:
        """Every weight an adaptation adds (fp32, binary and quantized)."""
        if self.introduced_fp32_params is None or self.introduced_binary_params is None:
            return None
        return self.introduced_fp32_params + self.introduced_binary_params + (self.introduced_quantized_params or 0)

    def epoch_top1(self) -> list[tuple[int, float]]:
        """(epoch, top-1 of the evaluated split) for each epoch that was evaluated."""
        return [(h["epoch"], h[EPOCH_TOP1]) for h in self.history or [] if h.get(EPOCH_TOP1) is not None]

    def epoch_losses(self) -> list[tuple[int, float]]:
        """(epoch, mean training loss) for each epoch."""
        return [(h["epoch"], h[EPOCH_LOSS]) for h in self.history or [] if h.get(EPOCH_LOSS) is not None]

    def set_top1(self, split: str, final: float | None, best: float | None) -> None:
        """The last and the best epoch's top-1 of ``split`` (``test`` or ``val``)."""
        setattr(self, f"{split}_top1", final)
        setattr(self, f"best_{split}_top1", best)

    def set_bn_top1(self, split: str, averaged: float | None, precise: float | None) -> None:
        """The last epoch's top-1 of ``split`` with averaged and with re-estimated BN statistics; the network
        leaves with the re-estimated ones where there are any, so theirs is the headline."""
        setattr(self, f"{split}_top1_averaged_bn", averaged)
        setattr(self, f"{split}_top1_precise_bn", precise)
        if precise is not None:
            setattr(self, f"{split}_top1", precise)

    def value(self, name: str) -> Any:
        """The field ``name`` (a search's ``optimized_metrics``); a name that is none is one line."""
        if name not in FIELDS:
            raise RecordError(f"{name!r} is not a metric a run records; choose from {', '.join(sorted(FIELDS))}")
        return getattr(self, name)

    # -------------------------------------------------------------- the file

    def to_dict(self) -> dict:
        """The JSON object a run's file holds: every measured field (None ones left out), nested parts as objects."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "run_dir":
                continue
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def write(self, path: str | Path) -> Path:
        """The record to ``path``, whole or not at all (:func:`bnn_adapt.files.write_json`)."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, content: object, where: str = "a run's record") -> RunRecord:
        """The record ``content`` holds; anything else (another kind of JSON, a key no record has) is one line."""
        if not isinstance(content, dict):
            raise RecordError(f"{where} holds a {type(content).__name__}, not a run's record: the file is damaged")
        unknown = sorted(set(content) - FIELDS - {"run_dir"})
        for name, kind in NESTED.items():
            part = content.get(name)
            if part is not None and not isinstance(part, dict):
                unknown.append(name)
            elif part:
                unknown += [f"{name}.{k}" for k in sorted(set(part) - {f.name for f in fields(kind)})]
        if unknown:
            schema = content.get("results_schema", 1)
            raise RecordError(
                f"{where} holds {', '.join(map(str, unknown[:5]))}, which no record of results schema "
                f"{RESULTS_SCHEMA} has (it says schema {schema}): run it again with this version"
            )
        return cls(**{k: v for k, v in content.items() if k != "run_dir"})

    @classmethod
    def from_json(cls, path: str | Path) -> RunRecord:
        """The record in ``path``; unreadable, damaged or not a record: one line naming it."""
        try:
            content = json.loads(Path(path).read_text())
        except OSError as exc:
            raise RecordError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise RecordError(f"{path} is not JSON ({exc}): the file is damaged; run it again") from exc
        record = cls.from_dict(content, str(path))
        record.run_dir = Path(path).parent
        return record

    @classmethod
    def read(cls, run_dir: str | Path, name: str = "metrics.json") -> RunRecord | None:
        """The record in ``run_dir``, or None where there is none or it is no record (such a run is not complete)."""
        try:
            return cls.from_json(Path(run_dir) / name)
        except RecordError:
            return None


FIELDS = frozenset(f.name for f in fields(RunRecord)) - {"run_dir"}


def result_problem(record: RunRecord, cfg: DictConfig, cfg_hash: str | None = None) -> str | None:
    """Why the results a run recorded no longer stand for ``cfg`` (its config, the meaning of its
    numbers, the data it read), or None when they do."""
    if record.config_hash != (cfg_hash or config_hash(cfg)):
        return "its config differs"
    if record.results_schema != RESULTS_SCHEMA:
        schema = record.results_schema
        return f"it recorded results schema {schema}, and this code writes schema {RESULTS_SCHEMA}"
    recorded, now = record.data or DataIdentity(), DataIdentity(**dataset_identity(cfg))
    if recorded.location != now.location:
        return f"it read the data at {recorded.location}, this config reads {now.location}"
    if recorded.fingerprint != now.fingerprint:
        return f"the files under {now.location} changed since it ran ({recorded.files} -> {now.files} files)"
    return None


def completed(run_dir: str | Path, cfg: DictConfig, base_sha256: str | None = None) -> RunRecord | None:
    """The run's record if it finished with this exact config and data (:func:`result_problem`), else None.

    An adaptation run also records the SHA-256 of the base checkpoint it adapted: when the file at
    that path has since changed (a base retrained in place) or gone, the run no longer counts.
    """
    record = RunRecord.read(run_dir)
    if record is None or not record.complete or result_problem(record, cfg) is not None:
        return None
    recorded = record.base_checkpoint_sha256
    return record if recorded is None or recorded == base_sha256 else None
