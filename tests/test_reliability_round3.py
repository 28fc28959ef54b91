"""Reliability, round 3 (issue 23): the thread count is a key and every result records what
decides it to the bit; a finished run counts only for the data it read; a failure after
training keeps what was measured and ``resume=true`` redoes only that step; the root config
carries no demo values into other datasets. (Items 2, 4, 8 and 9 are tested elsewhere;
item 7, packed inference, in test_packed_inference.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bnn_adapt.errors import CheckpointError
from bnn_adapt.run import task
from bnn_adapt.run.config import compose
from tests.test_reliability_round2 import error_lines
from tests.test_tables import run_module

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ 6: no demo values in other datasets' runs


def test_the_root_config_carries_no_demo_values_into_other_datasets():
    other = compose(["data=cifar5_5", "adapter=serial"])
    assert other.base.width == 1.0 and other.trainer.max_epochs == 75
    assert other.scheduler is None and other.base.pretrain is None
    demo = compose([])  # `python -m bnn_adapt`: the digits demo, as the README says
    assert demo.data.name == "digits" and demo.adapter.name == "udta" and demo.base.width == 0.25
    assert demo.trainer.max_epochs == 10 and demo.scheduler.T_max == 10
    assert dict(demo.base.pretrain) == {"epochs": 15, "lr": 1.0e-3}


def test_another_dataset_without_its_base_stops_with_one_line(tmp_path):
    """`python -m bnn_adapt data=cifar5_5 adapter=serial` used to train a width-0.25 network after pretraining
    a CIFAR base silently (root config: base.pretrain)."""
    result = run_module(tmp_path, "bnn_adapt", "data=cifar5_5", "adapter=serial")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "pretrain it first with `python -m bnn_adapt +experiment=cifar5_5_base`" in line
    assert not list((tmp_path / "outputs").glob("bases/*")), "nothing is pretrained"


def test_with_its_data_there_the_run_still_stops_before_pretraining(make_cfg, tmp_path):
    cfg = make_cfg("data=cifar5_5", "adapter=serial", base_dir=tmp_path / "bases")
    with pytest.raises(CheckpointError, match=r"pretrain it first with `python -m bnn_adapt \+experiment=cifar5_5_base"):
        task.run(cfg)
    assert not (tmp_path / "bases").exists() and not (tmp_path / "run" / "base_pretrain").exists()

