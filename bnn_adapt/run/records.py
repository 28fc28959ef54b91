"""What a run leaves in its ``metrics.json``, and the steps after training that must not lose it.

:func:`results_record` is a run's record: its numbers and what they depend on (config and its
hash, results schema, data, base checkpoint, versions and environment). What follows training
(the end of Lightning's fit with its trackers, the adapter file, the pretrained base) runs as
named steps (:func:`after_training`): when one fails, the measured numbers are written first,
with the step and its error beside them (``status: failed_after_training``), and ``resume=true``
redoes that step and those after it from the run's last checkpoint, without training again.
A record that cannot be written (a full or read-only disk) is printed to stderr instead.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bnn_adapt.errors import UserError
from bnn_adapt.files import WriteError, file_sha256
from bnn_adapt.run import builders
from bnn_adapt.run.provenance import environment
from bnn_adapt.run.record import COMPLETE, FAILED, FAILED_AFTER_TRAINING, PRUNED, RESULTS_SCHEMA, RunRecord
from bnn_adapt.run.results import config_hash, dataset_identity, package_versions

#: the steps after training, as a record names a failed one (``failed_step``)
FIT_END_STEP = "end of fitting"  # Lightning's end-of-fit hooks (callbacks, the trackers' last records)
ADAPTER_FILE_STEP = "adapter file"
BASE_FILE_STEP = "base checkpoint"


class FailedAfterTraining(UserError):
    """A step after training failed; ``run_dir``'s metrics.json holds the measured numbers beside it (or,
    where it could not be written, they were printed)."""

    def __init__(self, message: str, run_dir: str):
        super().__init__(message)
        self.run_dir = run_dir


def results_record(cfg: DictConfig, measured: RunRecord, status: str, **extra) -> RunRecord:
    """A run's ``metrics.json``: ``measured`` (its numbers and counts) and what they depend on (config
    and its hash, results schema, data, base checkpoint, versions and environment: README, reproducibility)."""
    return dataclasses.replace(
        measured,
        status=status,
        task=cfg.task,
        seed=cfg.seed,
        config_hash=config_hash(cfg),
        results_schema=RESULTS_SCHEMA,
        data=dataset_identity(cfg),
        base_checkpoint_sha256=adapted_base_sha256(cfg) if cfg.task in ("adapt", "evaluate") else None,
        versions=package_versions(),
        environment=environment(),
        config=OmegaConf.to_container(cfg, resolve=True),
        **extra,
    )


def write_record(path: Path, record: RunRecord) -> None:
    """``record`` to ``path``; when that fails, printed to stderr in one block (what was measured stays with
    the user) before the :class:`WriteError` naming the path and the cause is raised."""
    try:
        record.write(path)
    except WriteError:
        print(f"{path} could not be written; its content:", file=sys.stderr)
        print(record.to_json(), file=sys.stderr, flush=True)
        raise


def finish(cfg: DictConfig, measured: RunRecord) -> RunRecord:
    record = results_record(cfg, measured, PRUNED if measured.status == PRUNED else COMPLETE)
    out = Path(cfg.paths.output_dir)
    try:
        write_record(out / "metrics.json", record)
    except WriteError as exc:
        raise FailedAfterTraining(
            f"{exc}; every epoch ran and its numbers are printed above; free space and run the same command "
            "with resume=true to write them, without training again",
            str(out),
        ) from exc
    line = f"{cfg.task} done: top-1 {record.test_top1:.4f}" if record.test_top1 is not None else f"{cfg.task} done"
    if record.val_top1 is not None:
        line += f" (validation {record.val_top1:.4f})"
    if record.size_pct is not None:
        line += f", size {record.size_pct:.3f}% of the base"
    if record.epoch_time_s:
        line += f", {record.epoch_time_s:.2f} s/epoch"
    print(f"{line}; results in {out / 'metrics.json'}")
    return record


def adapted_base_sha256(cfg: DictConfig) -> str | None:
    """What an adaptation run records of its base: the SHA-256 of the checkpoint file it reads."""
    return file_sha256(builders.base_checkpoint_file(cfg))


def after_training(
    cfg: DictConfig,
    measured: RunRecord,
    steps: list[tuple[str, Any]],
    fit_error: BaseException | None = None,
    first: str | None = None,
) -> RunRecord:
    """The steps after training in order (from step ``first`` on), then the complete ``metrics.json``.

    When Lightning's end of fit (``fit_error``) or a step fails, ``metrics.json`` gets everything
    measured, with status ``failed_after_training``, the step and its error, and
    :class:`FailedAfterTraining` is raised.
    """
    failed = (FIT_END_STEP, fit_error) if fit_error is not None else None
    names = [name for name, _ in steps]
    for name, step in steps[names.index(first) if first in names else 0 :]:
        if failed is not None:
            break
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - recorded beside the measured numbers, then raised
            failed = (name, exc)
    if failed is None:
        return finish(cfg, measured)
    name, exc = failed
    out = Path(cfg.paths.output_dir)
    error = f"{type(exc).__name__}: {exc}"
    record = results_record(cfg, measured, FAILED_AFTER_TRAINING, failed_step=name, error=error)
    try:
        write_record(out / "metrics.json", record)
        kept = f"its numbers are in {out / 'metrics.json'}"
    except WriteError as unwritten:
        kept = f"its numbers are printed above ({unwritten})"
    raise FailedAfterTraining(
        f"{name} failed after training ({error}); every epoch ran and {kept}; "
        "the same command with resume=true finishes the run from its last checkpoint, without training again",
        str(out),
    ) from exc


def record_failure(cfg: DictConfig, exc: BaseException) -> None:
    """A failed run leaves its reason where its results would be; when even that cannot be written, a note
    says so and ``exc`` stays the error the run ends with."""
    record = RunRecord(
        status=FAILED,
        error=f"{type(exc).__name__}: {exc}",
        task=cfg.get("task"),
        seed=cfg.get("seed"),
        config_hash=config_hash(cfg),
        results_schema=RESULTS_SCHEMA,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    try:
        record.write(Path(cfg.paths.output_dir) / "metrics.json")
    except WriteError as unwritten:
        print(f"note: this failure is not recorded: {unwritten}", file=sys.stderr, flush=True)
