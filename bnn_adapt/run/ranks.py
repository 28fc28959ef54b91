"""Runs that a cluster launcher starts once per device (``trainer=ddp_slurm``: srun, one task per GPU).

Each such process runs the whole task function as one rank of plain DDP (Lightning's
``SLURMEnvironment`` reads rank and world size from SLURM). Rank 0 alone claims the run
directory and writes the run's files; every other rank trains in step with it and writes its
own files under ``<run dir>/rank<k>/`` (its copy of the metrics, adapter and base), so that
nothing of the run is written twice. ``trainer=ddp`` (ddp_spawn) starts its workers itself,
after the task has begun, so there every task function runs as rank 0.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict


def launched_rank() -> int:
    """This process's global rank as its launcher set it (``SLURM_PROCID``, ``RANK``, ...); 0 if none did."""
    return rank_zero_only.rank


def launched_world_size() -> int:
    """How many processes the launcher started for this run (``SLURM_NTASKS``, ``WORLD_SIZE``); 1 if none."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def rank_config(cfg: DictConfig, rank: int) -> DictConfig:
    """``cfg`` for rank ``rank`` > 0: its outputs (and a pretraining's base file) under ``<run dir>/rank<k>/``."""
    private = Path(cfg.paths.output_dir) / f"rank{rank}"
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(private)
        if cfg.task == "pretrain":
            cfg.base.save_to = str(private / Path(cfg.base.save_to).name)
    return cfg
