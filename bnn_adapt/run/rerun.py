"""Whether a run runs: what its directory already holds decides.

A complete run of the same config, data and base is skipped (a search's trial whose configuration
another trial trained too); one that no longer stands runs again; ``resume=true`` continues the newest
unfinished run of the config, or redoes the steps after training of one that failed there.
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, open_dict

from bnn_adapt.bases.checkpoint import best_epoch_path
from bnn_adapt.errors import UserError
from bnn_adapt.run import resume
from bnn_adapt.run.record import FAILED, FAILED_AFTER_TRAINING, RunRecord, completed, result_problem
from bnn_adapt.run.records import adapted_base_sha256
from bnn_adapt.run.results import config_hash, dataset_identity
from bnn_adapt.search import study


def skip_or_rerun(cfg: DictConfig, waited: bool) -> RunRecord | None:
    """The complete results of this config already in its directory (the run is skipped), else None.

    ``waited``: another process held the directory until now; if it failed there, this one does
    not run the same config again (two invocations of one sweep run each row once).
    """
    base_sha = adapted_base_sha256(cfg) if cfg.task == "adapt" else None
    done = completed(cfg.paths.output_dir, cfg, base_sha)
    missing = pretrained_files_missing(cfg) if done is not None and cfg.task == "pretrain" else []
    if missing:
        print(f"the complete run in {cfg.paths.output_dir} left no {' or '.join(missing)}: running it again")
        return None
    if done is not None:
        print(f"already complete (config {done.config_hash}): {Path(cfg.paths.output_dir) / 'metrics.json'}")
        return done
    twin = study.finished_twin(cfg, base_sha) if cfg.task == "adapt" else None
    if twin is not None:  # a search's trial whose configuration another trial trained
        return twin
    out = Path(cfg.paths.output_dir)
    earlier = RunRecord.read(out) or RunRecord(status=FAILED)
    same_config = earlier.config_hash == config_hash(cfg)
    if waited and same_config and earlier.failed:
        raise UserError(
            f"this run failed in the process that held {out} until now: {earlier.error}; not running it again"
        )
    if earlier.complete and same_config:
        problem = result_problem(earlier, cfg)
        if problem:
            print(f"the complete run in {out} no longer stands for this config ({problem}): running it again")
        else:
            print(f"base checkpoint {cfg.base.checkpoint} changed since the complete run in {out}: running it again")
    return None


def pretrained_files_missing(cfg: DictConfig) -> list[str]:
    """What a finished pretraining run wrote and is gone (its base, last and best epoch): it runs again."""
    last = Path(cfg.base.save_to)
    return [str(p) for p in (last, best_epoch_path(last)) if not p.is_file()]


def failed_after_training(cfg: DictConfig) -> RunRecord | None:
    """The record of this config's run that trained and failed after training, while it still stands
    (same config, data and base, checkpoint kept), else None."""
    out = Path(cfg.paths.output_dir)
    earlier = RunRecord.read(out)
    if not earlier or earlier.status != FAILED_AFTER_TRAINING or not (out / resume.CHECKPOINT).is_file():
        return None
    if result_problem(earlier, cfg) is not None:
        return None
    same_base = cfg.task != "adapt" or earlier.base_checkpoint_sha256 == adapted_base_sha256(cfg)
    return earlier if same_base else None


def choose_run_dir(cfg: DictConfig) -> DictConfig:
    """With ``resume=true``, continue the newest unfinished run of this config."""
    output_dir = Path(cfg.paths.output_dir)
    found = (
        resume.find_resumable(output_dir, output_dir.parent, config_hash(cfg), dataset_identity(cfg))
        if cfg.get("resume")
        else None
    )
    if cfg.get("resume") and found is None:
        print(f"resume=true: no unfinished run of this config under {output_dir.parent}; starting afresh")
    if found is None or found == output_dir:
        return cfg
    print(f"resuming the unfinished run in {found}")
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(found)
    return cfg
